"""transformers' side of the Hugging Face interop test (tests/hf_cli.rs).

  check.py logits  <hf dir> <tokens.json> <out.safetensors>   logits of a folder's model (fp32)
  check.py create  <hf dir> <tokens.json> <out.safetensors>   a random tiny MistralForCausalLM, saved
                                                               sharded with save_pretrained, and its logits
  check.py compare <a.safetensors> <b.safetensors> <tolerance> max |a - b| of the `logits` tensors
  check.py chat    <hf dir> <messages.json>                    token ids of apply_chat_template, as JSON:
                                                               {"conversation": [...], "prompt": [...]}
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM


def logits_of(model, tokens_path, out):
    rows = json.load(open(tokens_path))
    with torch.no_grad():
        logits = model(torch.tensor(rows)).logits.float().contiguous()
    save_file({"logits": logits}, out)


def main():
    torch.set_num_threads(1)
    cmd = sys.argv[1]
    if cmd == "logits":
        model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32, attn_implementation="eager")
        logits_of(model.eval(), sys.argv[3], sys.argv[4])
    elif cmd == "create":
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            sliding_window=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        )
        model = MistralForCausalLM(config).eval()
        # Non-trivial norm gains, so a mix-up of the norms shows.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(sys.argv[2], max_shard_size="100KB")
        model.config._attn_implementation = "eager"
        logits_of(model, sys.argv[3], sys.argv[4])
    elif cmd == "compare":
        a, b = load_file(sys.argv[2])["logits"], load_file(sys.argv[3])["logits"]
        if a.shape != b.shape:
            print(json.dumps({"error": f"shapes {list(a.shape)} vs {list(b.shape)}"}))
            sys.exit(1)
        diff = (a - b).abs().max().item()
        print(json.dumps({"max_abs_diff": diff, "max_abs": a.abs().max().item()}))
        sys.exit(0 if diff <= float(sys.argv[4]) else 1)
    elif cmd == "chat":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
        messages = json.load(open(sys.argv[3]))
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        conversation = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        print(json.dumps({"conversation": ids(conversation), "prompt": ids(prompt)}))
    else:
        sys.exit(f"unknown command {cmd}")


main()
