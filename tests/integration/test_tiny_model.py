"""Integration tests for the embedded tiny Qwen2.5-VL (medloc.models.tiny) and model loading
(medloc.models.loading): build -> save -> from_pretrained round trip (identical logits), the
processor round trip, the chat template's vision block (16 <|image_pad|> for 112x112), the
tokenizer (digits are single tokens, special-token ids), generation with vision tokens suppressed
under temperature sampling, deterministic byte-identical builds, freezing, and the errors a user
sees for a missing model folder. CPU only, one thread, no network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medloc.data.collate import encode_prompts, model_inputs
from medloc.data.prompts import build_messages
from medloc.models.loading import (
    freeze_vision_tower,
    load_model,
    load_processor,
    resolve_attn_implementation,
    resolve_dtype,
    resolve_model_path,
    vision_token_ids,
)
from medloc.models.tiny import (
    BUILD_MANIFEST,
    QWEN25VL_SPECIAL_TOKENS,
    TinyArch,
    build_tiny_model,
    create_tiny_model,
    main,
    tiny_arch,
    tiny_config,
    train_tiny_tokenizer,
)

torch.set_num_threads(1)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),
    ]


def _prompt_batch(processor):
    images = _images()
    messages = [
        build_messages("the skin lesion", images[0], "bare_list"),
        build_messages("the thyroid nodule", images[1], "bare_list"),
    ]
    return encode_prompts(processor, images, messages)


def _hash_folder(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- build, save, load


def test_build_twice_is_byte_identical_and_seed_changes_only_weights(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again", size="tiny-1m", seed=0)
    assert _hash_folder(again) == _hash_folder(tiny_dir)
    other = _hash_folder(build_tiny_model(tmp_path / "seed1", size="tiny-1m", seed=1))
    first = _hash_folder(tiny_dir)
    assert other["model.safetensors"] != first["model.safetensors"]
    # the tokenizer does not depend on the seed
    assert other["tokenizer.json"] == first["tokenizer.json"]


def test_saved_folder_is_an_ordinary_hf_model_folder(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                BUILD_MANIFEST}  # fmt: skip
    assert expected <= names
    # no temporary build folder is left behind
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny-1m"]


def test_rebuilding_same_build_is_a_noop_and_a_different_one_needs_overwrite(tmp_path):
    out = build_tiny_model(tmp_path / "m", size="tiny-1m", seed=0)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(out, size="tiny-1m", seed=0) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_model(out, size="tiny-1m", seed=3)
    build_tiny_model(out, size="tiny-1m", seed=3, overwrite=True)
    assert '"seed": 3' in (out / BUILD_MANIFEST).read_text()


def test_save_then_from_pretrained_gives_identical_logits(tmp_path, processor):
    model, mem_processor, info = create_tiny_model(size="tiny-1m", seed=5)
    model.save_pretrained(tmp_path / "m")
    mem_processor.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", dtype="float32", attn_implementation="sdpa")
    batch = model_inputs(_prompt_batch(processor))
    with torch.no_grad():
        a = model(**batch).logits  # [B, P, V]
        b = loaded(**batch).logits
    assert a.shape == (2, batch["input_ids"].shape[1], info.vocab_size)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_parameter_counts_of_both_sizes():
    model, _, info = create_tiny_model(size="tiny-1m", seed=0)
    assert info.params_total == sum(p.numel() for p in model.parameters())
    assert 0.8e6 < info.params_total < 1.1e6  # "about 1M"
    # vision: patch conv 3*2*14*14*64 = 75,264 without bias; 2 blocks + merger make up the rest
    assert model.model.visual.patch_embed.proj.weight.numel() == 75_264
    _, _, big = create_tiny_model(size="tiny-4m", seed=0)
    assert 3e6 < big.params_total < 6e6


def test_processor_save_load_round_trip(tmp_path, tiny_dir, processor):
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "p"))
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (copy / name).unlink()
    processor.save_pretrained(copy)
    again = load_processor(tmp_path / "p")
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.chat_template == processor.chat_template
    assert again.image_processor.size == processor.image_processor.size
    images = _images()
    a = encode_prompts(processor, images, ["<|vision_start|><|image_pad|><|vision_end|>hi"] * 2)
    b = encode_prompts(again, images, ["<|vision_start|><|image_pad|><|vision_end|>hi"] * 2)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_processor_pixel_budget_changes_token_count(tiny_dir):
    # max_pixels 56*56: smart_resize(112, 112) -> 56x56 -> 4x4 patches -> 2x2 = 4 image tokens
    small = load_processor(tiny_dir, min_pixels=28 * 28, max_pixels=56 * 56)
    batch = encode_prompts(small, _images()[:1], ["<|vision_start|><|image_pad|><|vision_end|>x"])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch["input_hw"].tolist() == [[56, 56]]
    assert int(batch["mm_token_type_ids"].sum()) == 4
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        load_processor(tiny_dir, min_pixels=100, max_pixels=10)


def test_folder_in_the_released_qwen_layout_loads_the_same_way(tmp_path, tiny_dir, processor):
    """Qwen/Qwen2.5-VL-3B-Instruct ships preprocessor_config.json (with min/max_pixels keys) and
    chat_template.json rather than processor_config.json; load_processor must read it and the
    pixel override must win over the file's min_pixels/max_pixels."""
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "released"))
    (folder / "processor_config.json").unlink()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": processor.chat_template})
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }))  # fmt: skip
    image = [Image.new("RGB", (448, 448))]
    text = ["<|vision_start|><|image_pad|><|vision_end|>x"]
    full = load_processor(folder)
    assert full.chat_template == processor.chat_template
    # 448*448 = 200,704 <= 12,845,056: kept, 448/14 = 32 patches a side
    assert encode_prompts(full, image, text)["image_grid_thw"].tolist() == [[1, 32, 32]]
    capped = load_processor(folder, max_pixels=112 * 112)
    # 448*448 > 12,544: beta = sqrt(200704/12544) = 4, 448/4 = 112 -> 8 patches a side
    assert encode_prompts(capped, image, text)["image_grid_thw"].tolist() == [[1, 8, 8]]


# ---------------------------------------------------------------- tokenizer and chat template


def test_tokenizer_digits_are_single_tokens(processor):
    tok = processor.tokenizer
    ids = tok("123", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3"]
    answer = tok("<answer>[105,7,64,99]</answer>", add_special_tokens=False)["input_ids"]
    digit_tokens = [t for t in tok.convert_ids_to_tokens(answer) if any(c.isdigit() for c in t)]
    # 105,7,64,99 has 3+1+2+2 = 8 digits, each its own token
    assert digit_tokens == list("10576499")
    assert tok.decode(answer) == "<answer>[105,7,64,99]</answer>"


def test_special_token_ids_in_config_come_from_the_tokenizer(tiny_dir, processor, model):
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN25VL_SPECIAL_TOKENS}
    # appended after the BPE vocabulary in Qwen2.5-VL's order (real ids 151643..151656)
    first = ids["<|endoftext|>"]
    assert [ids[t] - first for t in QWEN25VL_SPECIAL_TOKENS] == list(range(14))
    cfg = model.config
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.text_config.eos_token_id == ids["<|im_end|>"] == tok.eos_token_id
    assert cfg.text_config.pad_token_id == ids["<|endoftext|>"] == tok.pad_token_id
    assert cfg.text_config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert processor.image_token_id == ids["<|image_pad|>"]
    assert vision_token_ids(processor) == sorted(
        ids[t] for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                         "<|image_pad|>", "<|video_pad|>")
    )  # fmt: skip


def test_chat_template_has_qwen_structure_and_16_image_pads(processor):
    messages = build_messages("the skin lesion", _images()[0], "bare_list")
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Please provide the bounding box coordinate of the region this sentence describes: "
        "the skin lesion. Answer as <answer>[x1,y1,x2,y2]</answer>.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    batch = encode_prompts(processor, _images()[:1], [messages])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    # 112x112 -> 8x8 patches of 14 -> 2x2 merge -> 16 image tokens, in one vision block
    assert tokens.count("<|vision_start|>") == 1 and tokens.count("<|vision_end|>") == 1
    start, end = tokens.index("<|vision_start|>"), tokens.index("<|vision_end|>")
    assert tokens[start + 1 : end] == ["<|image_pad|>"] * 16
    assert tokens.count("<|image_pad|>") == 16
    assert batch["input_hw"].tolist() == [[112, 112]]


# ---------------------------------------------------------------- generation


def test_generation_samples_with_temperature_and_never_emits_vision_tokens(processor, model):
    batch = _prompt_batch(processor)
    banned = vision_token_ids(processor)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **model_inputs(batch),
            do_sample=True,
            temperature=0.9,
            top_p=1.0,
            top_k=0,
            max_new_tokens=12,
            num_return_sequences=4,
            suppress_tokens=banned,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    prompt_len = batch["input_ids"].shape[1]
    completions = out.sequences[:, prompt_len:]  # [B*G, L]
    assert completions.shape == (8, 12)
    assert not torch.isin(completions, torch.tensor(banned)).any()
    scores = torch.stack(out.scores, dim=1)  # [B*G, L, V] processed (temperature, suppression)
    logits = torch.stack(out.logits, dim=1)  # [B*G, L, V] raw
    assert torch.isneginf(scores[..., banned]).all()
    allowed = torch.ones(scores.shape[-1], dtype=torch.bool)
    allowed[banned] = False
    # temperature sampling: processed score = raw logit / 0.9 on every allowed token
    torch.testing.assert_close(scores[..., allowed], logits[..., allowed] / 0.9)
    # sampling, not greedy: some sampled token is not the arg-max of its step
    assert (completions != logits.argmax(-1)).any()
    texts = processor.batch_decode(completions, skip_special_tokens=True)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)


# ---------------------------------------------------------------- loading helpers


def test_freeze_vision_tower_counts_and_freezes(tmp_path, tiny_dir):
    model = load_model(tiny_dir)
    info = (tiny_dir / BUILD_MANIFEST).read_text()
    frozen = freeze_vision_tower(model)
    assert f'"params_vision": {frozen}' in info
    assert all(not p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable + frozen == sum(p.numel() for p in model.parameters())


def test_missing_model_folder_says_how_to_get_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        resolve_model_path(tmp_path / "Qwen2.5-VL-3B-Instruct")
    assert "huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir" in str(err.value)
    assert "never downloads" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:  # the 7B folder names the 7B checkpoint
        resolve_model_path(tmp_path / "Qwen2.5-VL-7B-Instruct")
    assert "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_processor(tmp_path / "empty")


def test_attention_and_dtype_choices():
    assert resolve_attn_implementation("auto", dtype=torch.float32, cuda_available=True) == "sdpa"
    assert resolve_attn_implementation("auto", dtype=torch.bfloat16, cuda_available=False) == "sdpa"
    assert resolve_attn_implementation("eager", dtype=torch.float32) == "eager"
    with pytest.raises(ValueError, match="'flash'"):
        resolve_attn_implementation("flash", dtype=torch.float32)
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="'fp32'"):
        resolve_dtype("fp32")


def test_bad_size_and_bad_mrope_section_are_rejected():
    with pytest.raises(ValueError, match=r"'tiny-2m'.*\['tiny-1m', 'tiny-4m'\]"):
        tiny_arch("tiny-2m")
    bad = TinyArch(
        text_hidden=128, text_layers=1, text_heads=4, text_kv_heads=2, text_mlp=64,
        mrope_section=(4, 6, 8),  # sums to 18, head_dim/2 = 128/4/2 = 16
        vision_hidden=64, vision_depth=1, vision_heads=2, vision_mlp=64, bpe_vocab_size=300,
    )  # fmt: skip
    with pytest.raises(ValueError, match="must sum to head_dim/2 = 16"):
        tiny_config(bad, train_tiny_tokenizer(300))


def test_cli_builds_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--size", "tiny-1m", "--out", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["--size", "tiny-1m", "--out", str(out), "--seed", "2"]) == 2
    assert "overwrite" in capsys.readouterr().err
