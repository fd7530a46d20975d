"""End-to-end LoRA fine-tuning: real MiniLM (and SmolLM2, slow) weights, real Ray Train (2 workers, DDP over gloo),
the micro real slice (conftest `micro_fk`); the exported adapter checked with plain peft, outside crossrec."""

import json

import numpy as np
import pytest
import torch

from crossrec.config import LoraConfig, RunSettings, load_config

# Small enough for a 2-core machine: ~30 users, 16-token item texts, 8-sequence batches.
E2E = [
    "mode=end-to-end",
    "epochs=2",
    "dim=32",
    "layers=1",
    "n_negatives=4",
    "batch_size=8",
    "max_tokens=16",
    "valid_max_targets=0",
    "patience=0",
    "backbone_lr=1e-3",
    "lora.rank=4",
]


@pytest.fixture(scope="module")
def e2e_bundle(ray_cluster, vector_cache, micro_fk, tmp_path_factory):
    from trainers.pipeline import train_bundle

    out = tmp_path_factory.mktemp("bundles") / "e2e"
    meta = train_bundle(micro_fk, out, load_config(overrides=E2E), RunSettings(workers=2, name="e2e"), progress=False)
    return out, meta


def test_end_to_end_lora_trains_the_backbone_and_lowers_the_loss(e2e_bundle):
    from safetensors.torch import load_file

    out, meta = e2e_bundle
    hist = meta["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["train/loss"] < hist[0]["train/loss"]
    assert meta["config"]["mode"] == "end-to-end"
    # peft's own format; LoRA B starts at zero, so non-zero B matrices mean the backbone was trained.
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and set(cfg["target_modules"]) == {"query", "key", "value"}
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(b) == 18 and all(v.abs().max() > 0 for v in b)  # 6 layers x q, k, v


def test_adapter_loads_with_plain_peft_and_matches_the_bundle(e2e_bundle, micro_fk):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from crossrec.backbones import load_backbone, resolve_backbone
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.inference import bundle_backbone
    from crossrec.splits import Splits

    out, _ = e2e_bundle
    bundle = load_bundle(out)
    data = Dataset.load(micro_fk)
    splits = Splits(data)
    rows = np.arange(0, len(splits.item_ids), 7)
    texts = catalog_texts(data.items.take(splits.item_row[rows]), template_of("", 16))
    # Outside crossrec: transformers + peft + mean pooling, as the MiniLM model card does.
    path = resolve_backbone("minilm").path
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(path, local_files_only=True), str(out / "adapter")
    ).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        hidden = peft_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    plain = ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    ours = bundle_backbone(bundle).encode(texts, max_length=16)  # merged adapter
    np.testing.assert_allclose(ours, plain, atol=2e-5)
    frozen = load_backbone("minilm").encode(texts, max_length=16)
    assert np.abs(frozen - plain).max() > 1e-4  # the adapter changes the embeddings
    # The bundle's item vectors were recomputed with the adapted backbone (Ray Data job) before export.
    with torch.inference_mode():
        expect = bundle.model.item_vectors(torch.from_numpy(plain))
    got = torch.cat([bundle.item_matrix(d)[1] for d in bundle.domains])[torch.from_numpy(rows)]
    np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=1e-4)


def test_zero_shot_items_are_embedded_by_the_adapted_backbone(e2e_bundle, tiny_ao):
    from crossrec.backbones import load_backbone
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import load_adapted_backbone
    from crossrec.inference import catalog_vectors
    from crossrec.splits import Splits

    out, _ = e2e_bundle
    bundle = load_bundle(out)
    data = Dataset.load(tiny_ao)  # arts/office: domains the bundle never saw
    splits = Splits(data)
    vecs = catalog_vectors(bundle, data, splits)
    rows = np.arange(0, len(splits.item_ids), 11)
    texts = catalog_texts(data.items.take(splits.item_row[rows]), template_of("", 16))
    unmerged = load_adapted_backbone("minilm", out / "adapter", merge=False)  # peft's forward, no merge
    with torch.inference_mode():
        adapted = bundle.model.item_vectors(torch.from_numpy(unmerged.encode(texts, max_length=16)))
        frozen = bundle.model.item_vectors(torch.from_numpy(load_backbone("minilm").encode(texts, max_length=16)))
    np.testing.assert_allclose(vecs[rows].numpy(), adapted.numpy(), atol=1e-4)
    assert (vecs[rows] - frozen).abs().max() > 1e-4


def test_init_from_an_end_to_end_bundle_loads_its_lora_adapter(e2e_bundle, micro_fk):
    """--init BUNDLE in end-to-end mode: at step 0 the backbone's LoRA weights and the recommender's are the
    source bundle's (before, a fresh adapter - B = 0 - was trained instead)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from crossrec.dataset import Dataset
    from crossrec.model import CrossRecModel
    from crossrec.splits import splits_for
    from trainers.train import initial_model, resolved_init

    out, meta = e2e_bundle
    cfg = resolved_init(
        load_config(overrides=[*E2E, f"init_from={out}", "text_prior_decay=0.6", "text_prior_cross=0.1"])
    )
    data = Dataset.load(micro_fk)
    sp = splits_for(data, cfg, training=True)
    model = initial_model(cfg, data, sp, sp.domains, CrossRecModel(cfg, len(sp.domains), in_dim=384), None)
    want = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    have = get_peft_model_state_dict(model.encoder.backbone.model)
    assert set(want) == set(have) and len(want) == 36
    for k in want:
        assert torch.equal(have[k].float(), want[k].float()), k
    assert any(v.abs().max() > 0 for k, v in have.items() if "lora_B" in k)
    rec = load_file(str(out / "model.safetensors"))
    for k, v in model.recommender.state_dict().items():
        assert torch.equal(v, rec[k]), k
    with pytest.raises(ValueError, match="`init_from`: the bundle's adapter has lora.rank=4"):
        bad = resolved_init(
            load_config(
                overrides=[*E2E, f"init_from={out}", "lora.rank=8", "text_prior_decay=0.6", "text_prior_cross=0.1"]
            )
        )
        initial_model(bad, data, sp, sp.domains, CrossRecModel(bad, len(sp.domains), in_dim=384), None)


def test_bad_lora_config_fails_naming_the_field(micro_fk, tmp_path, capsys):
    from crossrec.backbones import load_backbone
    from crossrec.finetune import apply_lora
    from crossrec_cli import main

    with pytest.raises(ValueError, match=r"`lora.rank` must be > 0, got 0"):
        load_config(overrides=["lora.rank=0"])
    with pytest.raises(ValueError, match=r"`lora.dropout` must be in \[0, 1\), got 1.5"):
        LoraConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"unknown config key `lora.ranks` \(accepted: lora.alpha, lora.dropout"):
        load_config(overrides=["lora.ranks=4"])
    with pytest.raises(
        ValueError,
        match=r"`lora.target_modules`: q_proj not in backbone 'minilm' "
        r"\(its linear layers: dense, key, query, value\)",
    ):
        apply_lora(load_backbone("minilm"), LoraConfig(target_modules=["query", "q_proj"]))
    assert (
        main(
            [
                "train",
                "--data",
                str(micro_fk),
                "--out",
                str(tmp_path / "b"),
                "--mode",
                "end-to-end",
                "--set",
                "lora.per_domain=true",
                "--set",
                "lora.enabled=false",
            ]
        )
        == 2
    )
    assert "`lora.per_domain` needs `lora.enabled: true`" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"`lora.per_domain` names one adapter per domain.*'default'"):
        apply_lora(load_backbone("minilm"), LoraConfig(per_domain=True), ["food", "default"])


def test_per_domain_adapters_train_export_and_load_with_plain_peft(ray_cluster, vector_cache, micro_fk, tmp_path):
    """One LoRA adapter per domain on a shared MiniLM under 2-worker DDP (a batch may miss a domain: its adapter
    gets a zero gradient, no DDP error); each domain's adapter is a peft folder of its own, the two differ, and
    each domain's bundle vectors are its own adapter's embeddings."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from crossrec.backbones import load_backbone
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import domain_adapters
    from crossrec.inference import bundle_backbone, has_domain_adapters
    from crossrec.splits import Splits
    from trainers.pipeline import train_bundle

    out = tmp_path / "pd"
    meta = train_bundle(
        micro_fk,
        out,
        load_config(overrides=[*E2E, "epochs=1", "lora.per_domain=true"]),
        RunSettings(workers=2, name="pd"),
        progress=False,
    )
    assert meta["config"]["lora"]["per_domain"] is True
    bundle = load_bundle(out)
    assert has_domain_adapters(bundle) and domain_adapters(out / "adapter") == ["food", "kitchen"]
    food, kitchen = (load_file(str(out / "adapter" / d / "adapter_model.safetensors")) for d in ("food", "kitchen"))
    assert food.keys() == kitchen.keys()
    assert all(v.abs().max() > 0 for k, v in food.items() if "lora_B" in k)  # trained (B starts at zero)
    assert max((food[k] - kitchen[k]).abs().max() for k in food) > 0  # two adapters, not one

    data = Dataset.load(micro_fk)
    splits = Splits(data)
    texts = catalog_texts(data.items.take(splits.item_row), template_of("", 16))
    for d in ("food", "kitchen"):
        rows = np.arange(splits.offset[d], splits.offset[d] + splits.n_items[d])[::5]
        base = load_backbone("minilm")
        base.model = PeftModel.from_pretrained(base.model, str(out / "adapter" / d)).eval()  # plain peft
        plain = base.encode([texts[i] for i in rows], max_length=16)
        np.testing.assert_allclose(
            bundle_backbone(bundle, d).encode([texts[i] for i in rows], max_length=16), plain, atol=2e-5
        )
        with torch.inference_mode():
            expect = bundle.model.item_vectors(torch.from_numpy(plain))
        got = bundle.item_matrix(d)[1][torch.from_numpy(rows - splits.offset[d])]
        np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=1e-4)


@pytest.mark.slow
def test_smollm2_lora_steps_lower_the_loss(micro_fk):
    """A few LoRA steps on SmolLM2-135M (decoder, last-token pooling) on one real batch, in-process."""
    from crossrec.backbones import resolve_backbone
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import build_end_to_end
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import SequenceData, loss_inputs

    cfg = load_config(
        overrides=[
            *E2E,
            "backbone=smollm2-135m",
            "dropout=0",
            "lora.dropout=0",
            "text_prior_decay=0.6",
            "text_prior_cross=0.1",
        ]
    )
    data = Dataset.load(micro_fk)
    splits = Splits(data)
    torch.manual_seed(0)
    texts = catalog_texts(data.items.take(splits.item_row), template_of("", cfg.max_tokens))
    model = build_end_to_end(
        cfg, CrossRecModel(cfg, 2, in_dim=resolve_backbone(cfg.backbone).dim, n_items=len(texts)), texts
    )
    assert set(cfg.lora.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]) <= {
        n.rsplit(".", 1)[-1] for n, _ in model.encoder.backbone.model.named_modules()
    }
    batch = next(SequenceData(splits, cfg.max_len).batches(8, np.random.default_rng(0)))
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    inputs = loss_inputs(
        batch, lambda i: i, torch.from_numpy(splits.item_domain), domain_items, 4, np.random.default_rng(1), 2
    )
    opt = torch.optim.AdamW(
        [
            {"params": list(model.recommender.parameters())},
            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": 1e-3},
        ],
        lr=1e-3,
    )
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bounded_backbone_gradients_keep_the_loss_and_reach_only_the_chosen_items(micro_fk):
    """`backbone_grad_items` bounds the backbone's memory: the loss is the same number (every item still gets
    its vector), but only the targets, then history items, up to the bound, carry gradients into the backbone."""
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import build_end_to_end, grad_rows
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import SequenceData, loss_inputs

    data = Dataset.load(micro_fk)
    splits = Splits(data)
    texts = catalog_texts(data.items.take(splits.item_row), template_of("", 16))
    batch = next(SequenceData(splits, 30).batches(8, np.random.default_rng(0)))
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    inputs = loss_inputs(
        batch, lambda i: i, torch.from_numpy(splits.item_domain), domain_items, 4, np.random.default_rng(1), 2
    )
    n = len(inputs["item_x"])
    rows = grad_rows(n, inputs, 5)
    targets = set(inputs["cand_index"][inputs["labels"]].tolist())
    assert sorted(rows.tolist()) == list(range(n)) and set(rows[: len(targets)].tolist()) == targets

    losses, grads = {}, {}
    for bound in (0, 5):
        cfg = load_config(
            overrides=[
                *E2E,
                "dropout=0",
                "lora.dropout=0",
                "text_prior_decay=0.6",
                "text_prior_cross=0.1",
                f"backbone_grad_items={bound}",
            ]
        )
        torch.manual_seed(0)
        model = build_end_to_end(cfg, CrossRecModel(cfg, 2, in_dim=384, n_items=len(texts)), texts)
        model.train()
        model.encoder.eval()  # the backbone's own dropout off: both runs see the same vectors
        seen = []
        model.encoder.register_forward_hook(lambda m, a, out: seen.append((len(a[0]), out.requires_grad)))
        loss = model(**inputs)
        loss.backward()
        losses[bound] = float(loss.detach())
        grads[bound] = seen
    assert losses[5] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0] == [(n, True)]  # unbounded: one forward of every item, with gradients
    assert grads[5][0] == (5, True) and all(not g for _, g in grads[5][1:])
    assert sum(k for k, _ in grads[5]) == n


def test_items_without_gradients_reuse_recent_backbone_vectors_from_the_bank(micro_fk):
    """`backbone_bank_steps`: a step's items without gradients take the vector the backbone gave them at most that
    many steps ago (exactly that vector), and run the backbone again once it is older; 0 re-encodes every step."""
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import build_end_to_end
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import SequenceData, loss_inputs

    data = Dataset.load(micro_fk)
    splits = Splits(data)
    texts = catalog_texts(data.items.take(splits.item_row), template_of("", 16))
    batch = next(SequenceData(splits, 30).batches(8, np.random.default_rng(0)))
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    inputs = loss_inputs(
        batch, lambda i: i, torch.from_numpy(splits.item_domain), domain_items, 4, np.random.default_rng(1), 2
    )
    n = len(inputs["item_x"])
    extra = ["text_prior_decay=0.6", "text_prior_cross=0.1", "backbone_grad_items=5"]
    for bank in (0, 2):
        cfg = load_config(overrides=[*E2E, *extra, f"backbone_bank_steps={bank}"])
        model = build_end_to_end(cfg, CrossRecModel(cfg, 2, in_dim=384, n_items=len(texts)), texts)
        model.train()
        encoded = []
        model.encoder.register_forward_hook(lambda m, a, out: encoded.append((len(a[0]), out.requires_grad)))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        per_step = []
        for _ in range(4):
            encoded.clear()
            model(**inputs).backward()
            opt.step()
            opt.zero_grad()
            per_step.append(sum(k for k, g in encoded if not g))
        if bank == 0:
            assert per_step == [n - 5] * 4
        else:  # step 0 fills the bank, steps 1-2 read it, step 3 finds it 3 steps old
            assert per_step == [n - 5, 0, 0, n - 5]
            assert model.bank is not None and model.steps == 4
            model.refresh_bank(torch.zeros(len(texts), 384))  # validation's catalog vectors refill every row
            assert bool((model.bank_step == 4).all())


def test_end_to_end_memory_is_estimated_and_a_run_that_cannot_fit_is_refused(micro_fk, tmp_path, capsys):
    from crossrec.backbones import resolve_backbone
    from crossrec.finetune import backbone_size, check_memory, memory_estimate
    from crossrec_cli import main

    path = resolve_backbone("minilm").path
    hidden, layers, params = backbone_size(path)
    assert (hidden, layers) == (384, 6) and 22e6 < params < 23e6  # all-MiniLM-L6-v2
    cfg = load_config(overrides=["mode=end-to-end", "max_tokens=64", "backbone_grad_items=32"])
    est = memory_estimate(cfg, hidden, layers, params)
    half = memory_estimate(
        load_config(overrides=["mode=end-to-end", "max_tokens=64", "backbone_grad_items=16"]), hidden, layers, params
    )
    assert est["grad_items"] == 32 and half["activations"] == pytest.approx(est["activations"] / 2)
    assert check_memory(cfg, path, 2, 100.0)["total"] == pytest.approx(est["total"])
    with pytest.raises(
        ValueError,
        match=r"needs about .* GiB \(2 worker\(s\) x .*available: lower "
        r"`backbone_grad_items` \(to about \d+\) or `max_tokens`",
    ):
        check_memory(cfg, path, 2, 2 * (est["total"] - est["activations"] / 2))
    # The command refuses before Ray starts, naming the setting (every item with gradients cannot fit anywhere).
    assert (
        main(
            [
                "train",
                "--data",
                str(micro_fk),
                "--out",
                str(tmp_path / "b"),
                "--mode",
                "end-to-end",
                "--set",
                "backbone_grad_items=0",
                "--set",
                "max_tokens=512",
                "--set",
                "batch_size=4096",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "end-to-end training needs about" in err and "set `backbone_grad_items`" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_smollm2_end_to_end_with_the_default_memory_bound_trains_within_its_estimate(
    ray_cluster, vector_cache, micro_fk, tmp_path
):
    """The defaults (batch 256, 128 negatives per domain, 64-token texts) sent every item of a step through
    SmolLM2 with gradients and were killed by Ray's memory monitor; `backbone_grad_items` bounds it, and each
    worker's peak stays under the estimate checked before the run."""
    from crossrec.backbones import prepare_backbone
    from crossrec.finetune import backbone_size, memory_estimate
    from trainers.pipeline import train_bundle

    cfg = load_config(overrides=["mode=end-to-end", "backbone=smollm2-135m", "epochs=1", "valid_max_targets=0"])
    assert cfg.backbone_grad_items == 32 and cfg.batch_size == 256 and cfg.n_negatives == 128
    meta = train_bundle(micro_fk, tmp_path / "b", cfg, RunSettings(workers=2, name="smollm2-e2e"), progress=False)
    est = memory_estimate(cfg, *backbone_size(prepare_backbone("smollm2-135m").path), workers=2)
    (epoch,) = meta["metrics"]["history"]
    assert epoch["worker/peak_rss_mb"] / 1024 < est["total"]
    assert (tmp_path / "b" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_full_fine_tune_lowers_the_loss_and_its_exported_backbone_scores_as_the_trained_model(
    ray_cluster, vector_cache, micro_fk, tmp_path
):
    """`lora.enabled: false` trains every backbone weight (2 workers, DDP): the loss falls, the bundle's adapter/
    is a whole Hugging Face model (plain `AutoModel` loads it), and the backbone reloaded from the bundle gives the
    trained model's item vectors and loss: the checkpoint's weights through the training path (`EndToEndModel`,
    its pre-tokenized catalog) against the export path (merged copy embedded by Ray Data, then reloaded)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from crossrec.backbones import load_backbone, resolve_backbone
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of
    from crossrec.finetune import build_end_to_end, is_adapter_dir, load_backbone_state
    from crossrec.inference import bundle_backbone
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import SequenceData, loss_inputs
    from trainers.pipeline import train_bundle

    over = [*E2E, "lora.enabled=false", "backbone_lr=1e-4", "epochs=3"]
    out = tmp_path / "full"
    meta = train_bundle(micro_fk, out, load_config(overrides=over), RunSettings(workers=2, name="full"), progress=False)
    hist = meta["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train/loss"] < hist[0]["train/loss"]

    adapter = out / "adapter"
    assert not is_adapter_dir(adapter) and (adapter / "config.json").is_file()
    plain = AutoModel.from_pretrained(adapter, local_files_only=True).state_dict()
    base = AutoModel.from_pretrained(resolve_backbone("minilm").path, local_files_only=True).state_dict()
    changed = [k for k in base if k in plain and not torch.equal(base[k], plain[k])]
    assert any("word_embeddings" in k for k in changed) and any("encoder.layer.5." in k for k in changed)

    # The trained model, rebuilt from the checkpoint the bundle was made from, through the training-time path.
    bundle = load_bundle(out)
    cfg = bundle.config
    data = Dataset.load(micro_fk)
    splits = Splits(data)
    texts = catalog_texts(data.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
    rec = CrossRecModel(cfg, len(bundle.domains), in_dim=bundle.meta["in_dim"], n_items=len(texts))
    trained = build_end_to_end(cfg, rec, texts)
    ckpt = meta["checkpoint"]
    rec.load_state_dict(load_file(f"{ckpt}/model.safetensors"))
    load_backbone_state(trained.encoder.backbone, load_file(f"{ckpt}/backbone.safetensors"))
    trained.eval()
    with torch.inference_mode():
        mine = rec.item_vectors(trained.encoder.embed(torch.arange(len(texts))))
        reloaded = bundle_backbone(bundle).encode(texts, max_length=cfg.max_tokens)  # the bundle's full model
        exported = bundle.model.item_vectors(torch.from_numpy(reloaded))
    stored = torch.cat([bundle.item_matrix(d)[1] for d in bundle.domains])  # Ray Data job over the merged copy
    np.testing.assert_allclose(exported.numpy(), mine.numpy(), atol=1e-4)
    np.testing.assert_allclose(stored.numpy(), mine.numpy(), atol=1e-4)
    frozen = load_backbone("minilm").encode(texts, max_length=cfg.max_tokens)
    assert np.abs(frozen - reloaded).max() > 1e-3  # the export is the fine-tuned backbone, not the base

    # Scores: one real batch's loss (every logit of it) from the trained module and from the bundle's model on
    # the reloaded backbone's vectors.
    batch = next(SequenceData(splits, cfg.max_len).batches(8, np.random.default_rng(0)))
    domain_items = [torch.arange(splits.offset[d], splits.offset[d] + splits.n_items[d]) for d in splits.domains]
    inputs = loss_inputs(
        batch, lambda i: i, torch.from_numpy(splits.item_domain), domain_items, 4, np.random.default_rng(1), 2
    )
    with torch.inference_mode():
        want = trained(**inputs)
        got = bundle.model(**{**inputs, "item_x": torch.from_numpy(reloaded)[inputs["item_x"]]})
    assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
