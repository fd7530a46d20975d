"""Backbone registry with the real packaged weights: minilm (encoder), smollm2-135m (GGUF decoder, converted once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossrec import backbones
from crossrec.backbones import (
    BackboneSpec,
    known_backbones,
    load_backbone,
    lora_target_modules,
    resolve_backbone,
)
from crossrec.text import truncate_by_tokens

TITLES = [
    "Mae Ploy Thai Green Curry Paste - 14 oz jar",
    "Ateco Food Coloring Kit, 6 colors",
    "omnigrid 60mm rotary cutter",
]


@pytest.fixture(scope="session")
def minilm():
    return load_backbone("minilm")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> dict:
    """Converts smollm2-135m once per session into a fresh cache, in a child process started with
    HF_HUB_OFFLINE=1 and an empty HF_HOME (huggingface_hub reads both at import, so only a fresh process
    shows that nothing needs the hub). The child also encodes with minilm under the same conditions."""
    root = tmp_path_factory.mktemp("crossrec-cache")
    env = {
        **os.environ,
        "CROSSREC_CACHE_DIR": str(root),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path_factory.mktemp("empty-hf-home")),
    }
    code = (
        "import json, time\n"
        "from crossrec.backbones import prepare_backbone, load_backbone\n"
        "t = time.perf_counter(); spec = prepare_backbone('smollm2-135m'); seconds = time.perf_counter() - t\n"
        "v = load_backbone('minilm').encode(['omnigrid 60mm rotary cutter'])\n"
        "print(json.dumps({'path': spec.path, 'seconds': seconds, 'minilm_shape': list(v.shape)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"root": root, **result}


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSREC_CACHE_DIR", str(smollm2_cache["root"]))
        return load_backbone("smollm2-135m")


def test_registry_names_and_unknown_name():
    assert known_backbones() == ["minilm", "smollm2-135m"]
    with pytest.raises(
        ValueError,
        match=re.escape("unknown backbone 'x' (known: minilm, smollm2-135m, or a local Hugging Face model directory)"),
    ):
        resolve_backbone("x")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_backbone(tmp_path)


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    spec = minilm.spec
    assert (spec.kind, spec.pooling, spec.family, spec.dim) == ("encoder", "mean", "bert", 384)
    assert Path(spec.path, "model.safetensors").is_file()
    ours = minilm.encode(TITLES, normalize=True)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    reference = SentenceTransformer(spec.path, device="cpu", local_files_only=True).encode(TITLES)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_minilm_similar_titles_are_closer(minilm):
    v = minilm.encode(
        [
            "Mae Ploy Thai Green Curry Paste - 14 oz jar",
            "Maesri Thai Red Curry Paste, 4 oz can",
            "omnigrid 60mm rotary cutter",
        ],
        normalize=True,
    )
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_encode_restores_input_order_across_length_sorted_batches(minilm):
    texts = ["pen", TITLES[0] + " " + TITLES[1] + " " + TITLES[2], "", TITLES[2], TITLES[1] * 3, "a b"]
    batched = minilm.encode(texts, batch_size=2)
    one_by_one = np.stack([minilm.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="single str"):
        minilm.encode("pen")


def test_local_directory_works_like_the_registry_name(minilm):
    spec = resolve_backbone(minilm.spec.path)
    assert spec == BackboneSpec(
        name=minilm.spec.path, path=minilm.spec.path, kind="encoder", pooling="mean", family="bert", dim=384
    )
    np.testing.assert_allclose(load_backbone(spec).encode(TITLES), minilm.encode(TITLES), atol=1e-6)


def test_a_saved_fine_tuned_encoder_loads_without_a_weights_report(minilm, tmp_path):
    # What an end-to-end export writes (crossrec.finetune.write_merged): the model without the unused pooler.
    minilm.model.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    # A process of its own: transformers' log handler holds the stderr it found at import (pytest's, here).
    code = f"from crossrec.backbones import load_backbone; print(load_backbone({str(tmp_path)!r}).model.pooler)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None"
    np.testing.assert_allclose(load_backbone(tmp_path).encode(TITLES), minilm.encode(TITLES), atol=1e-6)


def test_lora_targets_name_real_modules(minilm):
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(minilm.spec.family)
    assert targets == ["query", "key", "value"]
    names = {n.rsplit(".", 1)[-1] for n, _ in minilm.model.named_modules()}
    assert set(targets) <= names
    assert lora_target_modules("llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="no default LoRA target modules for family 'nope'"):
        lora_target_modules("nope")

    # LoRA wraps the Backbone module itself and trains end to end (a fresh copy: the session one stays frozen).
    model = get_peft_model(load_backbone("minilm"), LoraConfig(r=4, target_modules=targets))
    model.train()
    pooled = model(**minilm.tokenize(TITLES[:2], max_length=32))  # (2, 384)
    pooled.pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 6 * 3 * 2  # 6 layers x (query, key, value) x (lora_A, lora_B)
    assert all(p.grad is not None for p in trainable)


def test_smollm2_converted_once_offline_and_reused(smollm2_cache, monkeypatch):
    root = smollm2_cache["root"]
    cache = root / "backbones" / "smollm2-135m"
    assert Path(smollm2_cache["path"]) == cache
    assert smollm2_cache["minilm_shape"] == [1, 384]
    assert {"config.json", "model.safetensors", "tokenizer.json", "crossrec_backbone.json"} <= set(os.listdir(cache))
    assert os.listdir(root / "backbones") == ["smollm2-135m"]  # no temporary directory left behind
    print(f"smollm2-135m GGUF -> safetensors conversion: {smollm2_cache['seconds']:.1f} s")

    monkeypatch.setenv("CROSSREC_CACHE_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stamps = {f: (cache / f).stat().st_mtime_ns for f in os.listdir(cache)}

    def no_conversion(*args):
        raise AssertionError("the cache was converted again")

    monkeypatch.setattr(backbones, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    backbone = load_backbone("smollm2-135m")
    print(f"smollm2-135m cached load: {time.perf_counter() - start:.1f} s")
    assert {f: (cache / f).stat().st_mtime_ns for f in os.listdir(cache)} == stamps
    assert backbone.spec.path == str(cache)


def test_smollm2_encodes_with_last_token_pooling(smollm2, smollm2_cache):
    spec = smollm2.spec
    assert (spec.kind, spec.pooling, spec.family, spec.dim) == ("decoder", "last", "llama", 576)
    assert type(smollm2.model).__name__ == "LlamaModel"  # base model: hidden states, not logits
    texts = [*TITLES, ""]
    v = smollm2.encode(texts, batch_size=4)
    assert v.shape == (4, 576) and v.dtype == np.float32 and np.isfinite(v).all()
    # Right padding + mask-based last position: a text's vector does not depend on its batch mates.
    alone = np.stack([smollm2.encode([t])[0] for t in texts[2:]])
    np.testing.assert_allclose(v[2:], alone, atol=1e-3, rtol=1e-4)
    # The converted cache is itself a local Hugging Face directory: a decoder, inferred from its config.
    local = resolve_backbone(smollm2_cache["path"])
    assert (local.kind, local.pooling, local.family, local.dim) == ("decoder", "last", "llama", 576)


def test_smollm2_forward_has_gradients(smollm2):
    batch = smollm2.tokenize(["omnigrid rotary cutter", "pen"], max_length=8)
    assert (batch["input_ids"][:, -1] == smollm2.tokenizer.eos_token_id).all()
    smollm2.train()
    try:
        pooled = smollm2(**batch)  # (2, 576)
        assert pooled.shape == (2, 576) and pooled.requires_grad
        pooled.pow(2).mean().backward()
        q = smollm2.model.layers[0].self_attn.q_proj.weight
        assert q.grad is not None and q.grad.abs().sum() > 0
    finally:
        smollm2.zero_grad(set_to_none=True)
        smollm2.eval()


def test_truncate_by_tokens_with_byte_level_bpe(smollm2):
    tok = smollm2.tokenizer
    texts = ["Crème brûlée torch 🔥 kit — stainless steel, refillable butane, 1300°C flame", "short"]
    cut = truncate_by_tokens(texts, tok, 6)
    assert cut[1] == "short"
    assert texts[0].startswith(cut[0]) and len(cut[0]) < len(texts[0])
    assert len(tok(cut[0], add_special_tokens=False)["input_ids"]) <= 6
