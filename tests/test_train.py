"""Training, adapters and merging on the tiny smoke model (seconds each, no network)."""
import json
from pathlib import Path

import pytest
from trl import SFTConfig, SFTTrainer

from helpers import Crash, at_root, crash_at
from medqa_zh import config, data, merge, models, prompts, runs, tiny, train

pytestmark = pytest.mark.timeout(1200)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy


@pytest.fixture(scope="module")
def lora_run(smoke_root):
    """One LoRA run of the smoke profile, shared by the tests that only read its outputs."""
    with at_root(smoke_root):
        cfg = config.load("smoke")
        run = train.prepare(cfg, "lora")
        metrics = train.train(run, resume=False)
    return cfg, run, metrics


# --------------------------------------------------------------------------- what the loss sees


def test_label_mask_covers_exactly_the_answer_tokens(lora_run):
    _, run, _ = lora_run
    seen = set()
    for i in range(len(run.trainer.train_dataset)):
        view = train.label_view(run, i)
        in_loss = [token for token, counted in view if counted]
        letter = in_loss[2] if len(in_loss) > 2 else None
        seen.add(letter)
        # the answer line, end of turn and the newline after it; every prompt token is masked
        assert "".join(in_loss) == prompts.format_answer(letter) + "<|im_end|>\n"
        first = next(j for j, (_, counted) in enumerate(view) if counted)
        assert all(counted for _, counted in view[first:]) and not any(counted for _, counted in view[:first])
        assert "".join(t for t, _ in view[:first]).endswith("<|im_start|>assistant\n")
        if len(seen) == 5:
            break
    assert seen == set("ABCDE")


def test_collated_batch_masks_padding_too(lora_run):
    _, run, _ = lora_run
    dataset = run.trainer.train_dataset
    lengths = [len(x) for x in dataset["input_ids"]]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert lengths[short] < lengths[long]
    batch = run.trainer.data_collator([dataset[short], dataset[long]])
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()  # padding never counts
    assert [(row != -100).sum().item() for row in labels] == [5, 5]  # 答案 ： X <|im_end|> \n


def test_answer_only_loss_equals_trls_loss_and_gradients(smoke):
    """Our compute_loss projects only labelled positions (fast on CPU); it must be trl's loss."""
    import torch
    from trl import SFTTrainer

    run = train.prepare(smoke(**{"train.precision": "fp32"}), "lora", out_dir=smoke().out / "models" / "loss-check")
    trainer, model = run.trainer, run.trainer.model
    for p in model.parameters():  # B starts at zero; make the adapter matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    results = []
    for compute_loss in (type(trainer).compute_loss, SFTTrainer.compute_loss):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=None)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.item() > 0
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_logged_metrics_are_trls_weighted_by_tokens_over_the_whole_point(lora_run):
    """mean_token_accuracy and entropy as trl logs them for one micro-batch; over several, weighted by their answer
    tokens (trl averages the micro-batches' means); num_tokens, the input tokens trained on so far."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    trainer, model = lora_run[1].trainer, lora_run[1].trainer.model
    seen = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    jsonl = trainer.pop_callback(train.JsonlLog)  # the fixture's train_log.jsonl stays as its run wrote it
    trainer.add_callback(Capture)
    try:
        model.train()
        batches = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ([0], [1, 2, 3, 4, 5])]
        hand = []  # answer tokens right, answer tokens, summed entropy: by hand, per micro-batch
        with torch.no_grad():
            for batch in batches:
                logits, targets, _ = train.answer_logits(model, dict(batch), model.get_output_embeddings(),
                                                         trainer.accelerator.autocast)
                logp = logits.log_softmax(-1)
                hand.append(((logits.argmax(-1) == targets).sum().item(), targets.numel(), -(logp.exp() * logp).sum().item()))
        SFTTrainer.compute_loss(trainer, model, dict(batches[0]))
        SFTTrainer.log(trainer, {})
        trainer.compute_loss(model, dict(batches[0]))
        trainer.log({})
        theirs, ours = seen[-2], seen[-1]
        for key in ("mean_token_accuracy", "entropy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
        assert "num_tokens" in theirs and ours["num_tokens"] == trainer.state.num_input_tokens_seen > 0

        for batch in batches:
            trainer.compute_loss(model, dict(batch))
        trainer.log({})
        correct, tokens, entropy = map(sum, zip(*hand, strict=True))
        assert 0 < correct < tokens and hand[0][1] < hand[1][1]  # the test can tell the two ways of averaging apart
        assert seen[-1]["mean_token_accuracy"] == pytest.approx(correct / tokens, rel=1e-6)
        assert seen[-1]["entropy"] == pytest.approx(entropy / tokens, rel=1e-4)
        assert seen[-1]["mean_token_accuracy"] != pytest.approx(sum(h[0] / h[1] for h in hand) / 2)  # not trl's way
    finally:
        trainer.pop_callback(Capture)
        trainer.add_callback(jsonl)


@pytest.mark.parametrize("loss_on, kernel", [("completion", "sdpa"), ("all", "sdpa"), ("completion", "eager")])
def test_packed_rows_give_the_unpacked_loss_and_gradients(smoke, loss_on, kernel):
    """train.padding_free puts a micro-batch's examples in one row, with position ids restarting at each: the loss
    and every gradient must be the padded batch's, answer-only masking included. Without the restarting
    position ids the examples would attend to each other, and the same check fails (the last lines)."""
    import torch

    runs_ = {}
    for packing in (False, True):
        cfg = smoke(**{"train.precision": "fp32", "train.padding_free": packing, "train.loss_on": loss_on,
                       "train.attn_implementation": kernel})
        runs_[packing] = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / f"packing-{packing}-{loss_on}-{kernel}")
    padded, packed = runs_[False].trainer, runs_[True].trainer
    torch.manual_seed(1)
    for (name, a), (other, b) in zip(padded.model.named_parameters(), packed.model.named_parameters(), strict=True):
        assert name == other
        if a.requires_grad:  # B starts at zero; make the adapter matter, the same in both
            torch.nn.init.normal_(a, std=0.05)
            b.data.copy_(a.data)
    # six rows of different lengths, so the padded batch has padding (the smoke world's questions are much alike)
    by_length = sorted(range(len(padded.train_dataset)), key=lambda i: len(padded.train_dataset[i]["input_ids"]))
    rows = by_length[:3] + by_length[-3:]
    batches = {False: padded.data_collator([padded.train_dataset[i] for i in rows]),
               True: packed.data_collator([packed.train_dataset[i] for i in rows])}
    assert batches[False]["input_ids"].shape[0] == 6 and "attention_mask" in batches[False]
    assert batches[True]["input_ids"].shape[0] == 1 and "attention_mask" not in batches[True]
    assert (batches[False]["attention_mask"] == 0).any()  # the padded batch has padding; the packed row none
    assert batches[True]["input_ids"].shape[1] == batches[False]["attention_mask"].sum()

    def loss_and_grads(trainer, batch):
        trainer.model.zero_grad()
        loss = type(trainer).compute_loss(trainer, trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]

    (want, want_grads), (got, got_grads) = loss_and_grads(padded, batches[False]), loss_and_grads(packed, batches[True])
    labelled = int((batches[False]["labels"][:, 1:] != -100).sum())
    assert labelled == int((batches[True]["labels"][:, 1:] != -100).sum())  # the same tokens count in the loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    crossed = {k: v for k, v in batches[True].items() if k != "position_ids"}  # one long sequence: examples see each other
    leaked, _ = loss_and_grads(packed, crossed)
    assert abs(leaked.item() - want.item()) > 100 * abs(got.item() - want.item()) + 1e-5


def test_a_packed_run_trains_as_the_padded_one_does(smoke):
    """The same steps, packed and in micro-batches sized by tokens, end at the same losses as the padded run."""
    settings = {"train.max_steps": 4, "train.eval_steps": 4, "train.logging_steps": 1, "train.precision": "fp32",
                "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 2}
    logs, metrics = {}, {}
    for name, extra in (("padded", {}), ("packed", {"train.padding_free": True, "train.tokens_per_device": 700})):
        cfg = smoke(**settings, **extra)
        run = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / f"run-{name}")
        metrics[name] = train.train(run, resume=False)
        logs[name] = runs.read_log(run.out_dir)
    micro = metrics["packed"]["micro_batches"]
    assert micro["packed"] and micro["padding_share"] == 0 and micro["tokens_max"] <= 700
    assert micro["examples"] * micro["per_step"] == 8 and micro["per_step"] > 1  # 8 examples (~1,100 tokens) a step
    assert metrics["padded"]["micro_batches"] == {**metrics["padded"]["micro_batches"], "examples": 4, "per_step": 2}
    for key in ("loss", "eval_loss"):
        want = [r[key] for r in logs["padded"] if key in r]
        got = [r[key] for r in logs["packed"] if key in r]
        assert len(want) >= 2 and got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention"])
def test_an_attention_kernel_that_cannot_train_on_this_device_is_refused_before_loading(smoke, monkeypatch, kernel):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=f"train.attn_implementation = {kernel} .*Fix: set it to sdpa"):
        train.prepare(smoke(**{"train.attn_implementation": kernel, "model.device": "cpu"}), "lora")


def test_a_step_is_split_into_the_fewest_micro_batches_that_fit_the_token_budget():
    lengths = [100, 120, 300, 310, 50, 60, 70, 80]  # two steps of 4, each sorted as the stream is
    assert train.micro_batches(lengths, 4, budget=1000, packed=True) == 1  # 830 and 260 tokens
    assert train.micro_batches(lengths, 4, budget=700, packed=True) == 2  # halves: 220, 610, 110, 150
    assert train.micro_batches(lengths, 4, budget=1300, packed=False) == 1  # padded: 4 x 310
    assert train.micro_batches(lengths, 4, budget=700, packed=False) == 2  # 2 x 120, 2 x 310
    assert train.micro_batches(lengths, 4, budget=310, packed=True) == 4
    with pytest.raises(ValueError, match="tokens_per_device = 200 is smaller than the longest training example \\(310"):
        train.micro_batches(lengths, 4, budget=200, packed=True)
    assert train.micro_batch_tokens([10, 30], packed=True) == 40 and train.micro_batch_tokens([10, 30], packed=False) == 60


def test_auto_sizes_the_micro_batches_from_the_devices_memory(smoke):
    """``auto``: more memory, more tokens; full SFT's gradients and optimizer state are left out first."""
    run = train.prepare(smoke(**{"train.precision": "fp32"}), "lora", out_dir=smoke().out / "models" / "auto-check")
    model = run.trainer.model
    per_token = train.activation_bytes_per_token(model.config, "fp32", lora=True, head_share=0.05)
    small, large = (train.auto_tokens(model, "fp32", True, memory, 0.05) for memory in (2**30, 8 * 2**30))
    assert large > 7 * small and small == pytest.approx(2**30 * train.AUTO_MEMORY_SHARE / per_token, rel=0.1)
    full_per_token = train.activation_bytes_per_token(model.config, "fp32", lora=False, head_share=0.05)
    state = sum(p.numel() for p in model.parameters()) * 4 * 4  # weights, gradients, AdamW's two moments
    assert train.auto_tokens(model, "fp32", False, 2**30, 0.05) == pytest.approx(
        (2**30 - state) * train.AUTO_MEMORY_SHARE / full_per_token, rel=0.05)
    assert train.activation_bytes_per_token(model.config, "bf16", lora=False, head_share=0.05) < per_token
    every = train.activation_bytes_per_token(model.config, "fp32", lora=True, head_share=1.0)  # train.loss_on: all
    assert every - per_token == pytest.approx(0.95 * 3 * model.config.vocab_size * 4)
    share = train.loss_share(run.tokenizer, run.examples["train"], run.lengths["train"], "completion")
    assert 0 < share < 0.2  # 答案：X<|im_end|>\n of about a hundred tokens
    assert train.loss_share(run.tokenizer, run.examples["train"], run.lengths["train"], "all") == 1
    cfg = smoke(**{"train.precision": "fp32", "train.padding_free": True, "train.tokens_per_device": "auto"})
    micro = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "auto-plan").micro
    assert micro["token_budget"] > micro["tokens_max"] and micro["per_step"] == 1  # this machine's RAM holds a whole step


def _peak_extra_bytes(work) -> int:
    """The most memory ``work()`` held at once beyond what this process held before it (Linux: the peak resident set,
    ``VmHWM``, reset to the resident set first, as :func:`train.peak_memory` does)."""
    status = Path("/proc/self/status")
    if not Path("/proc/self/clear_refs").is_file():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")

    def read(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith(key))

    Path("/proc/self/clear_refs").write_text("5")
    before = read("VmRSS:")
    work()
    return read("VmHWM:") - before


@pytest.mark.parametrize("memory_gib, share", [(4, 0.05), (16, 0.05), (1, 1.0)])
def test_the_logged_entropy_fits_in_the_memory_the_auto_plan_counts(memory_gib, share):
    """entropy_sum runs on the loss's float32 logits before the backward pass, with every activation kept, and allocates
    float32 [rows, vocabulary] temporaries of its own. Of the plan's three copies of the head's logits
    (activation_bytes_per_token), the third, their gradient, is not allocated yet then: what the entropy holds beyond it
    must fit in what auto_tokens leaves, inside its share of the memory, beside the activations of its budget.
    Measured on Qwen2.5-0.5B's shape and 151,936-token vocabulary, at budgets whose micro-batch sends about 60 and 260
    answer rows through the head (train.loss_on: completion) and about 130 rows (loss_on: all)."""
    import math
    import types

    import torch

    shape = types.SimpleNamespace(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, vocab_size=151_936)
    model = types.SimpleNamespace(parameters=lambda: [torch.zeros(10_000)], config=shape)  # the memory is the activations'
    memory = memory_gib * 2**30
    tokens = train.auto_tokens(model, "bf16", True, memory, share)
    left = (memory - 40_000) * train.AUTO_MEMORY_SHARE - tokens * train.activation_bytes_per_token(shape, "bf16", True, share)
    rows = math.ceil(tokens * share)  # the head's rows in a micro-batch of the budget's tokens
    torch.manual_seed(0)
    logits = torch.randn(rows, shape.vocab_size)
    gradient = logits.numel() * 4  # the plan's third copy, free until the backward pass
    extra = _peak_extra_bytes(lambda: train.entropy_sum(logits))
    assert extra > 0.9 * gradient  # the measurement sees the entropy's temporaries (at least one of its rows' size)
    assert extra - gradient <= left, (f"{rows} rows: the entropy holds {extra / 2**20:.0f} MiB, {(extra - gradient) / 2**20:.0f} "
                                      f"MiB beyond the gradient's copy; the plan leaves {left / 2**20:.1f} MiB")


def test_the_entropy_is_the_same_whatever_its_chunk():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(300, 1000) * 3
    logp = logits.log_softmax(-1)
    whole = -(logp.exp() * logp).sum().double()
    for chunk in (1, 128, 299, 300, 1024):
        torch.testing.assert_close(train.entropy_sum(logits, chunk), whole, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key, value", [("train.padding_free", "yes"), ("train.tokens_per_device", 0),
                                        ("train.tokens_per_device", "lots"), ("train.attn_implementation", "flash")])
def test_a_bad_batching_setting_names_the_key(smoke, key, value):
    with pytest.raises(ValueError, match=key.replace(".", "\\.")):
        train.settings(smoke(**{key: value}), "lora")


def test_model_flops_count_every_projection_the_model_has(tiny_assets):
    """MFU's numerator from the config alone must match the model's own matmuls: 2 FLOPs per weight forward,
    full SFT 3x the forward, LoRA 2x plus its adapters; the LM head only at the tokens the loss reads."""
    import torch

    model = models.load_model(str(tiny_assets["model"]), "float32", setting="tiny")
    shape = model.config.to_dict()
    body = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    head = model.get_output_embeddings().weight.numel()
    assert runs.flops_per_token(shape, "full", 0, attended=0, head_share=1) == 6 * (body + head)
    assert runs.flops_per_token(shape, "lora", 1000, attended=0, head_share=0) == 4 * body + 6 * 1000
    attention = runs.flops_per_token(shape, "full", 0, attended=100, head_share=0) - 6 * body
    q = shape["num_attention_heads"] * (shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"])
    assert attention == 3 * shape["num_hidden_layers"] * 4 * q * 100


@pytest.mark.parametrize("name, precision, want", [
    ("NVIDIA H200", "bf16", 989), ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A10", "bf16", 125), ("NVIDIA L4", "fp32", 30.3),
    ("Tesla T4", "fp16", 65), ("Tesla T4", "bf16", None), ("NVIDIA GeForce RTX 4090", "bf16", None)])
def test_a_gpus_peak_is_found_by_its_name(name, precision, want):
    peak = runs.gpu_peak(name, precision)
    assert (peak and peak["tflops"]) == want
    if want:
        assert precision in peak["name"] and peak["source"] == "data sheet"


def test_a_run_reports_its_mfu_against_a_named_peak(lora_run):
    _, run, metrics = lora_run
    mfu = metrics["mfu"]
    assert mfu["flops_per_token"] == run.flops_per_token > 0
    assert mfu["peak"]["source"] == "measured" and "matmul" in mfu["peak"]["name"] and mfu["peak"]["tflops"] > 0
    assert mfu["achieved_tflops"] == pytest.approx(metrics["tokens_per_second"] * run.flops_per_token / 1e12)
    assert 0 < mfu["mfu"] == pytest.approx(mfu["achieved_tflops"] / mfu["peak"]["tflops"])
    steps = metrics["steps"]
    assert len(steps["seconds"]) == len(steps["tokens"]) == metrics["steps_this_session"]
    assert steps["tokens"] == sorted(steps["tokens"]) and steps["tokens"][-1] > 0
    table = runs.cost_table({"LoRA": metrics})
    assert mfu["peak"]["name"] in table.loc["MFU", "LoRA"] and "%" in table.loc["MFU", "LoRA"]


def test_under_fsdp_the_loss_is_trls_own(smoke, monkeypatch):
    """FSDP holds the LM head's weight in shards outside the model's forward: there the head must not be
    called on its own (the answer-only projection), and the loss is trl's."""
    run = train.prepare(smoke(**{"train.precision": "fp32"}), "lora", out_dir=smoke().out / "models" / "fsdp-check")
    trainer = run.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ours = trainer.compute_loss(trainer.model, dict(batch))
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(train, "answer_logits", lambda *a, **k: pytest.fail("the LM head was called outside the forward"))
    fsdp = trainer.compute_loss(trainer.model, dict(batch))
    assert fsdp.item() == pytest.approx(ours.item(), rel=1e-4)


def test_the_lm_head_projects_only_each_rows_labelled_tokens(smoke):
    """Rows of different lengths have their answers at different positions; projecting the union of
    those positions for every row costs batch-size times too much (GBs of logits on a GPU)."""
    import torch

    run = train.prepare(smoke(**{"train.precision": "fp32"}), "lora", out_dir=smoke().out / "models" / "head-check")
    trainer, model = run.trainer, run.trainer.model
    dataset = trainer.train_dataset
    lengths = [len(x) for x in dataset["input_ids"]]
    rows = sorted(range(len(lengths)), key=lengths.__getitem__)[:: max(1, len(lengths) // 4)][:4]
    assert len({lengths[i] for i in rows}) > 1  # answers at different positions
    batch = trainer.data_collator([dataset[i] for i in rows])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        loss = type(trainer).compute_loss(trainer, model, dict(batch))
    finally:
        hook.remove()
    vocab = model.get_output_embeddings().out_features
    assert sum(shape.numel() for shape in seen) == labelled * vocab, seen
    assert torch.isfinite(loss) and loss.item() > 0


def test_one_process_trains_on_one_gpu_however_many_are_visible(smoke, monkeypatch, capsys):
    """What transformers does on a host with 4 GPUs and no launcher: n_gpu = 4, DataParallel, batch x 4."""
    from trl import SFTConfig

    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 4))  # play a 4-GPU host
    # activation_checkpointing named: trl's default sets the old gradient_checkpointing, which transformers 5 warns of
    common = dict(output_dir="unused", per_device_train_batch_size=8, use_cpu=True, report_to="none",
                  activation_checkpointing=False)
    plain = SFTConfig(**common)
    assert plain.train_batch_size == 32  # the silent multiplication
    args = train.OneDeviceConfig(**common)
    assert args.visible_gpus == 4 and args.n_gpu == 1 and args.train_batch_size == 8
    run = train.prepare(smoke(), "lora", out_dir=smoke().out / "models" / "guard-check")
    assert isinstance(run.trainer.args, train.OneDeviceConfig) and run.trainer.args.n_gpu == 1
    assert "4 GPUs visible" in capsys.readouterr().out  # prepare() says so
    assert run.trainer.args.train_sampling_strategy == "sequential"  # the stream's own order


# --------------------------------------------------------------------------- training


def test_the_held_out_loss_falls_and_outputs_are_written(lora_run):
    _, run, metrics = lora_run
    log = runs.read_log(run.out_dir)
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(losses) >= 3
    # the held-out loss falls (the first eval is the base model's: eval_on_start); the training loss logged from step 5
    # need not, since the smoke world's base is pretrained on the answer format and its letter skew goes in a few steps
    assert len(evals) >= 2 and evals[-1] < evals[0]
    # the answer tokens' accuracy beside each loss, in [0, 1] (the trainer's own log, AnswerOnlySFTTrainer.log)
    accuracy = [r["mean_token_accuracy"] for r in log if "loss" in r]
    eval_accuracy = [r["eval_mean_token_accuracy"] for r in log if "eval_loss" in r]
    assert len(accuracy) == len(losses) and len(eval_accuracy) == len(evals)
    assert all(0 <= a <= 1 for a in accuracy + eval_accuracy)
    assert all(r["entropy"] > 0 and r["num_tokens"] == r["num_input_tokens_seen"] for r in log if "loss" in r)
    assert metrics["first_train_loss"] == losses[0] and metrics["last_train_loss"] == losses[-1]
    assert metrics["optimizer_steps"] == len(run.log.step_seconds) > 0
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_gib"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 models.FINGERPRINT_FILE, runs.RUN_FILE):
        assert (run.out_dir / name).is_file(), name
    assert runs.read_run(run.out_dir)["optimizer_steps"] == metrics["optimizer_steps"]


def test_all_knobs_come_from_the_profile(smoke):
    cfg = smoke(**{"train.lora.r": 4, "train.lora.alpha": 12, "train.learning_rate": 0.02, "train.per_device_train_batch_size": 4,
                   "train.gradient_accumulation_steps": 2, "train.max_steps": 3, "train.precision": "fp32",
                   "train.activation_checkpointing": True})
    run = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "knobs")
    args, lora = run.trainer.args, run.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha) == (4, 12)
    adapted = {name.rsplit(".", 1)[-1] for name in lora.target_modules}  # all-linear, resolved by peft
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (
        0.02, 4, 2, 3)
    assert args.max_length == 512 and not args.bf16 and args.activation_checkpointing
    full = train.settings(cfg, "full")
    assert full["learning_rate"] == cfg["train.full.learning_rate"] and "lora" not in full
    assert full["max_steps"] == 3  # train.full.max_steps is null in smoke: the LoRA value holds


def test_the_lora_config_is_the_profiles_and_wraps_the_trained_model(smoke):
    cfg = smoke(**{"train.lora.r": 4, "train.lora.alpha": 12, "train.lora.dropout": 0.1,
                   "train.lora.target_modules": ["q_proj", "v_proj"]})
    lora = train.lora_config(train.settings(cfg, "lora"))  # what 02 shows and prepare hands the trainer
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules), lora.task_type) == (
        4, 12, 0.1, {"q_proj", "v_proj"}, "CAUSAL_LM")
    run = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "lora-config")
    got = run.model.peft_config["default"]
    assert (got.r, got.lora_alpha, got.lora_dropout, set(got.target_modules)) == (4, 12, 0.1, {"q_proj", "v_proj"})
    wrapped = {name.split(".")[-2] for name, _ in run.model.named_modules() if name.endswith(".lora_A")}
    assert wrapped == {"q_proj", "v_proj"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train(smoke, precision):
    import torch

    cfg = smoke(**{"train.max_steps": 4, "train.precision": precision, "train.eval_steps": 4})
    run = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / f"lora-{precision}")
    base_dtype = next(p for n, p in run.model.named_parameters() if "lora_" not in n).dtype
    assert base_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert run.trainer.args.bf16 == (precision == "bf16")
    metrics = train.train(run, resume=False)
    assert metrics["precision"] == precision and metrics["optimizer_steps"] == 4
    assert all(p.dtype == torch.float32 for n, p in run.model.named_parameters() if "lora_" in n)


def test_full_sft_trains_every_parameter_and_saves_a_model(smoke):
    cfg = smoke(**{"train.max_steps": 3, "train.eval_steps": 3})
    run = train.prepare(cfg, "full", out_dir=cfg.out / "models" / "full-test")
    counts = train.parameter_counts(run.model)
    assert counts["trainable"] == counts["total"]
    metrics = train.train(run, resume=False)
    # 03's arithmetic: float32 weights, gradients and AdamW's two moments, 16 bytes a parameter, all held at the peak
    assert sum(runs.FULL_SFT_BYTES_PER_PARAMETER.values()) == 16
    assert metrics["peak_memory_gib"] * 2**30 >= counts["total"] * 16
    reloaded = models.load_model(str(run.out_dir), "float32", setting="full")
    assert sum(p.numel() for p in reloaded.parameters()) == counts["total"]


def test_a_crashed_run_resumes_and_ends_where_an_uninterrupted_one_does(smoke):
    import torch
    from safetensors.torch import load_file

    settings = {"train.max_steps": 10, "train.save_steps": 4, "train.eval_steps": 5, "train.logging_steps": 1,
                "train.precision": "fp32"}
    cfg = smoke(**settings)
    straight = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "straight")
    train.train(straight, resume=False)

    crashed = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "crashed")
    crashed.trainer.add_callback(crash_at(6))
    with pytest.raises(Crash):
        train.train(crashed, resume=False)
    assert (crashed.checkpoints / "checkpoint-4").is_dir()
    # step 5 was logged after checkpoint-4 (the crash at the end of step 6 came before its log)
    assert max(r["step"] for r in runs.read_log(crashed.out_dir)) == 5

    resumed = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "crashed")  # a fresh kernel
    metrics = train.train(resumed)
    assert metrics["resumed_from"].endswith("checkpoint-4")
    assert metrics["optimizer_steps"] == 10 and metrics["steps_this_session"] == 6
    steps = [r["step"] for r in runs.read_log(resumed.out_dir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # steps 5-6 were redone, not logged twice

    a = load_file(straight.out_dir / "adapter_model.safetensors")
    b = load_file(resumed.out_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)

    again = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "crashed")
    assert train.train(again) == runs.read_run(resumed.out_dir)  # finished: not trained twice


@pytest.mark.parametrize("lost", ["trainer_state.json", "rng_state.pth"])
def test_a_checkpoint_half_written_by_a_crash_is_skipped_and_the_one_before_resumed(smoke, lost, capsys):
    cfg = smoke(**{"train.max_steps": 6, "train.save_steps": 2, "train.save_total_limit": 3, "train.precision": "fp32"})
    run = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / f"half-{lost}")
    run.trainer.add_callback(crash_at(5))
    with pytest.raises(Crash):
        train.train(run)
    (run.checkpoints / "checkpoint-4" / lost).unlink()  # as if the crash came while checkpoint-4 was saved
    resumed = train.prepare(cfg, "lora", out_dir=run.out_dir)
    metrics = train.train(resumed)
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["optimizer_steps"] == 6
    assert f"checkpoint-4 is incomplete (no {lost}" in capsys.readouterr().out


def _crashed(smoke, name: str, **changes):
    """A run that crashed after its checkpoint at step 2, and the same run prepared again with ``changes``."""
    settings = {"train.max_steps": 6, "train.save_steps": 2, "train.precision": "fp32"}
    run = train.prepare(smoke(**settings), "lora", out_dir=smoke().out / "models" / name)
    run.trainer.add_callback(crash_at(3))
    with pytest.raises(Crash):
        train.train(run)
    return run, lambda: train.prepare(smoke(**{**settings, **changes}), "lora", out_dir=run.out_dir)


def test_resuming_with_other_settings_starts_over_and_keeps_the_earlier_checkpoints(smoke, capsys):
    run, again = _crashed(smoke, "changed", **{"train.learning_rate": 0.01})
    metrics = train.train(again())
    out = capsys.readouterr().out
    assert metrics["resumed_from"] is None and metrics["optimizer_steps"] == 6
    assert "holds checkpoints of another run (train.learning_rate changed)" in out and "starts over" in out
    aside = run.out_dir / train.ASIDE  # set aside, not deleted: with the log of the run they belong to
    assert (aside / "checkpoint-2" / "optimizer.pt").is_file() and runs.read_log_file(aside / runs.LOG_FILE)
    assert runs.read_run(run.out_dir)["settings"]["learning_rate"] == 0.01
    assert [r["step"] for r in runs.read_log(run.out_dir)][0] == 0  # the new run's log, from its start


def test_an_edited_system_prompt_refuses_the_resume_and_names_the_prompt(smoke, monkeypatch, capsys):
    run, again = _crashed(smoke, "prompt")
    monkeypatch.setattr(prompts, "SYSTEM_PROMPT", prompts.SYSTEM_PROMPT + "请简洁。")
    metrics = train.train(again())
    out = capsys.readouterr().out
    assert metrics["resumed_from"] is None
    assert "(the prompt (prompts.py: the system prompt, the instruction or the answer's form) changed)" in out
    assert (run.out_dir / train.ASIDE / "checkpoint-2").is_dir()


@pytest.mark.parametrize("change", [{"train.logging_steps": 2, "train.eval_steps": 3, "train.save_steps": 4, "train.save_total_limit": 1},
                                    {"train.tokens_per_device": 2048, "train.eval_batch_size": 3}])
def test_settings_that_do_not_change_training_do_not_block_a_resume(smoke, change):
    run, again = _crashed(smoke, "logging-" + "-".join(change)[:40].replace(".", ""), **change)
    metrics = train.train(again())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["optimizer_steps"] == 6
    assert not (run.out_dir / train.ASIDE).exists()


def test_the_eval_loss_questions_do_not_block_a_resume(smoke):
    """train.eval_questions changes which validation questions the eval loss reads, never a training step: a run that
    reached checkpoint-2 resumes from it with other eval questions, and sets nothing aside."""
    run, again = _crashed(smoke, "eval-questions", **{"train.eval_questions": 20})
    resumed = again()
    assert len(resumed.examples["eval"]) == 20 < len(run.examples["eval"])  # the eval-loss questions did change
    metrics = train.train(resumed)
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["optimizer_steps"] == 6
    assert not (run.out_dir / train.ASIDE).exists()


def test_a_run_key_names_each_input_that_changed():
    key = {"mode": "lora", "seed": 0, "world_size": 1, "optimizer": {"learning_rate": 1e-4, "lora": {"r": 8}},
           "inputs": {"data": "a", "prompt": "p", "template": "t", "tokens": "x"}}
    change = lambda part, **kw: {**key, part: {**key[part], **kw}}  # noqa: E731
    assert train.what_changed(key, key) == [] and train.same_run(key, key) and not train.same_run(None, key)
    assert train.what_changed(change("inputs", template="u", tokens="z"), key) == ["the chat template"]
    assert train.what_changed(change("inputs", data="b", tokens="z"), key) == [train.KEY_WORDS["data"]]
    assert train.what_changed(change("inputs", tokens="z"), key) == [train.KEY_WORDS["tokens"]]  # nothing else explains it
    assert train.what_changed(change("optimizer", lora={"r": 16}), key) == ["train.lora"]
    grpo = {**key, "mode": "grpo"}  # a GRPO run's settings are the grpo section's
    assert train.what_changed({**grpo, "optimizer": {**key["optimizer"], "learning_rate": 1.0}}, grpo) == ["grpo.learning_rate"]
    assert train.what_changed({**key, "seed": 1}, key) == ["the seed (seed)"]
    assert train.what_changed({**key, "world_size": 2}, key) == ["the number of processes"]
    # the eval-loss questions' tokens, which earlier versions recorded: they decide nothing, whatever they were
    assert train.same_run(change("inputs", eval_tokens="y"), key)
    assert train.what_changed(change("inputs", eval_tokens="y", data="b"), key) == [train.KEY_WORDS["data"]]
    old = {k: v for k, v in key.items() if k != "inputs"}  # written by an earlier version of the project
    assert train.what_changed(old, key) == ["the run key's form (an earlier version of the project wrote it)"]
    # train.num_train_epochs, renamed train.epochs: a run recorded under the old name resumes; another value does not
    epochs = change("optimizer", epochs=2)
    assert train.same_run({**epochs, "optimizer": {**key["optimizer"], "num_train_epochs": 2}}, epochs)
    assert train.what_changed({**epochs, "optimizer": {**key["optimizer"], "num_train_epochs": 3}}, epochs) == ["train.epochs"]


def test_the_token_digest_follows_the_tokens_and_the_loss_mask_in_order(lora_run):
    dataset = lora_run[1].trainer.train_dataset
    digest = train.token_digest(dataset)
    assert digest == train.token_digest(dataset.select(range(len(dataset))))
    assert digest != train.token_digest(dataset.select([1, 0, *range(2, len(dataset))]))  # the order
    every = dataset.map(lambda row, i: {"labels": row["input_ids"]} if i == 0 else row, with_indices=True)
    assert digest != train.token_digest(every)  # the same tokens, the loss on all of them


# --------------------------------------------------------------------------- errors


def test_an_example_longer_than_max_length_stops_the_run(smoke):
    with pytest.raises(ValueError, match=r"longer than train.max_length = 64 .*longest: train:\d+, \d+ tokens.*at least"):
        train.prepare(smoke(**{"train.max_length": 64}), "lora")


def test_empty_or_missing_training_split(smoke, smoke_root):
    cfg = smoke()
    path = cfg.out / "data" / "questions" / "train.jsonl"
    saved = path.read_bytes()
    try:
        path.write_text("")
        with pytest.raises(ValueError, match=r"train.jsonl has no questions.*data.splits.train = 'train'"):
            train.prepare(cfg, "lora")
        path.unlink()
        with pytest.raises(FileNotFoundError, match="run notebook 01_data"):
            train.prepare(cfg, "lora")
    finally:
        path.write_bytes(saved)


def test_a_missing_base_model_says_which_setting_to_fix(smoke, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDQA_BASE_MODEL", str(tmp_path / "no-such-model"))
    with pytest.raises(models.ModelNotFoundError, match=r"MEDQA_BASE_MODEL = .*no such folder.*hf download"):
        train.prepare(smoke(), "lora")
    monkeypatch.setenv("MEDQA_BASE_MODEL", str(tmp_path))  # a folder, but not a model
    with pytest.raises(models.ModelNotFoundError, match="no tokenizer_config.json"):
        train.prepare(smoke(), "lora")


def test_a_relative_model_folder_that_is_not_there_is_no_such_folder_not_a_hub_id(smoke, monkeypatch):
    monkeypatch.setenv("MEDQA_BASE_MODEL", "models/Qwen2.5-0.5B-Instruct")  # the README's form, before the copy
    cfg = smoke()
    assert Path(cfg.base_model).is_absolute() and cfg.base_model.endswith("models/Qwen2.5-0.5B-Instruct")
    with pytest.raises(models.ModelNotFoundError, match=r"MEDQA_BASE_MODEL = .*no such folder"):
        train.prepare(cfg, "lora")


@pytest.mark.parametrize("value, hub", [("Qwen/Qwen2.5-0.5B-Instruct", True), ("gpt2", True),
                                        ("models/Qwen2.5-0.5B-Instruct", False), ("outputs/cpu/models/merged", False),
                                        ("./merged", False), ("/abs/model", False), ("~/model", False),
                                        ("a/b/c", False), ("my model", False), ("here/model", False)])
def test_one_rule_tells_a_hub_id_from_a_folder(tmp_path, monkeypatch, value, hub):
    from medqa_zh import serve

    (tmp_path / "here").mkdir()  # an existing first folder makes x/y a path
    assert models.is_hub_id(value, root=tmp_path) is hub
    monkeypatch.chdir(tmp_path)  # the server decides by the same rule, relative to where it was started
    if hub:
        serve._check_model(value)
    else:
        with pytest.raises(FileNotFoundError, match="no model folder"):
            serve._check_model(value)


def test_the_chat_template_preview_needs_no_model(tmp_path, tiny_assets):
    messages = [{"role": "user", "content": "你好"}]
    note = models.chat_template_preview(str(tmp_path), messages, setting="MEDQA_BASE_MODEL")
    assert note.startswith("(no preview of the chat template: MEDQA_BASE_MODEL") and "no tokenizer_config.json" in note
    assert "<|im_start|>user\n你好<|im_end|>" in models.chat_template_preview(str(tiny_assets["model"]), messages)


def test_a_hub_id_without_the_hub_fails_clearly(smoke, monkeypatch):
    import huggingface_hub.constants

    # what an unreachable hub looks like, without waiting ~45 s for its retries (read at import, so patched)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MEDQA_BASE_MODEL", "no-such-owner/no-such-model")
    with pytest.raises(models.ModelNotFoundError, match=r"(?s)MEDQA_BASE_MODEL = 'no-such-owner/no-such-model' \(source tried: "
                       r"https://huggingface.co\).*Fix, one of: .*HF_ENDPOINT=https://hf-mirror.com.*"
                       r"modelscope:no-such-owner/no-such-model.*a local folder"):
        train.prepare(smoke(), "lora")


def test_precision_setting():
    assert models.training_precision("fp32") == "fp32"
    assert models.training_precision("bf16") == "bf16"
    assert models.training_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="train.precision"):
        models.training_precision("fp8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        models.training_precision("fp16", "cpu")


def test_peak_memory_sees_an_allocation():
    import numpy as np

    with train.peak_memory() as before:
        pass
    with train.peak_memory() as during:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        del block
    assert during["peak_gib"] - before["peak_gib"] > 0.25


# --------------------------------------------------------------------------- adapters and merging


def test_an_adapter_on_the_wrong_base_is_refused(lora_run, tmp_path):
    cfg, run, _ = lora_run
    tokenizer = tiny.build_tokenizer()
    narrower = tiny.build_model(tokenizer, hidden_size=32)
    with pytest.raises(models.AdapterMismatchError, match=r"has shape \(8, 192\), but .* of the base 'narrower' has 96 inputs.*Fix: load the adapter onto"):
        models.check_adapter(run.out_dir, narrower, "narrower")
    shallower = tiny.build_model(tokenizer, layers=1)
    with pytest.raises(models.AdapterMismatchError, match=r"layers.1.* does not have"):
        models.check_adapter(run.out_dir, shallower, "shallower")
    same_shapes = tiny.build_model(tokenizer, seed=1)
    with pytest.raises(models.AdapterMismatchError, match="same shapes, different model"):
        models.check_adapter(run.out_dir, same_shapes, "other seed")
    models.check_adapter(run.out_dir, models.load_model(cfg.base_model), cfg.base_model)  # the right one passes
    with pytest.raises(models.ModelNotFoundError, match="holds no LoRA adapter"):
        models.check_adapter(tmp_path, same_shapes, "x")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_model_equals_base_plus_adapter(lora_run, dtype):
    cfg, run, _ = lora_run
    merged_dir = cfg.out / "models" / f"merged-{dtype}"
    stale = merged_dir.with_name(merged_dir.name + ".tmp")  # what a crashed merge leaves behind
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "adapter_config.json").write_text("{}")
    merge.merge(cfg.base_model, run.out_dir, merged_dir, dtype=dtype)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (merged_dir / name).is_file(), name
    assert not (merged_dir / "adapter_config.json").exists()
    questions = data.load_split(cfg, "eval")[:6]
    comparison = merge.compare(cfg.base_model, run.out_dir, merged_dir, questions)
    assert comparison.dtype == dtype
    summary = merge.check(comparison)
    assert summary["passed"] and summary["argmax agrees on every prompt"]
    assert comparison.max_relative_diff <= merge.RELATIVE_TOLERANCE[dtype]
    # the check can fail: the adapter's effect is far above the tolerance
    effect = (comparison.table["max_abs_diff_base"] / comparison.table["max_abs_logit"]).min()
    assert effect > 10 * merge.RELATIVE_TOLERANCE[dtype]


def test_merge_check_fails_loudly_on_a_wrong_merge(lora_run):
    cfg, run, _ = lora_run
    not_merged = cfg.out / "models" / "not-merged"  # the base saved as if it were the merge
    base = models.load_model(cfg.base_model)
    base.save_pretrained(not_merged)
    models.load_tokenizer(cfg.base_model).save_pretrained(not_merged)
    (not_merged / merge.INFO_FILE).write_text(json.dumps({"dtype": "float32"}))
    comparison = merge.compare(cfg.base_model, run.out_dir, not_merged, data.load_split(cfg, "eval")[:4])
    with pytest.raises(merge.MergeMismatchError, match="differs from base \\+ adapter.*Do not serve"):
        merge.check(comparison)


def test_cost_table_reads_run_json(lora_run):
    _, run, metrics = lora_run
    table = runs.cost_table({"LoRA": json.loads((run.out_dir / runs.RUN_FILE).read_text())})
    assert table.loc["trainable parameters", "LoRA"] == metrics["parameters"]["trainable"]
    assert table.loc["saved weights (MiB)", "LoRA"] > 0


# --------------------------------------------------------------------------- what the model can learn


def _split(smoke, role="train"):
    return data.load_split(smoke(), role)


def test_a_shuffled_example_keeps_the_right_answer_text_under_its_new_letter(smoke):
    questions = _split(smoke)
    moved = 0
    for q in questions:
        s = train.shuffled(q, seed=0, epoch=0)
        assert s.options[s.answer_idx] == q.answer == s.answer  # the gold content, under its new letter
        assert sorted(s.options.values()) == sorted(q.options.values()) and sorted(s.options) == sorted(q.options)
        assert s.question == q.question and s.id == q.id
        assert train.shuffled(q, seed=0, epoch=0) == s  # seeded: the same example every run
        moved += s.answer_idx != q.answer_idx
    assert moved > len(questions) / 2
    # a new permutation in each epoch and for each seed
    assert any(train.shuffled(q, 0, 1).options != train.shuffled(q, 0, 0).options for q in questions[:5])
    assert any(train.shuffled(q, 1, 0).options != train.shuffled(q, 0, 0).options for q in questions[:5])


def test_the_gold_letters_of_a_shuffled_stream_are_close_to_uniform(smoke):
    questions = _split(smoke)
    skewed = [q.permuted(sorted(q.options, key=lambda letter: letter != q.answer_idx)) for q in questions]
    assert {q.answer_idx for q in skewed} == {"A"}  # every gold letter on A: the worst training split
    epochs = max(1, 2000 // len(skewed))
    plain = train.stream(skewed, epochs, seed=0, shuffle_options=False)
    shuffled = train.stream(skewed, epochs, seed=0, shuffle_options=True)
    assert len(shuffled) == len(plain) == epochs * len(skewed)
    assert {q.answer_idx for q in plain} == {"A"}
    shares = {letter: sum(q.answer_idx == letter for q in shuffled) / len(shuffled) for letter in "ABCDE"}
    # 5 letters over >= 2000 examples: a binomial share's standard error is < 0.9 points
    assert all(abs(share - 0.2) < 0.03 for share in shares.values()), shares


def test_every_epoch_reads_each_question_once_in_its_own_order(smoke):
    questions = _split(smoke)
    s = train.stream(questions, 3, seed=0, shuffle_options=True)
    n = len(questions)
    for epoch in range(3):
        assert sorted(q.id for q in s[epoch * n:(epoch + 1) * n]) == sorted(q.id for q in questions)
    assert [q.id for q in s[:n]] != [q.id for q in s[n:2 * n]]


def test_sorting_within_each_step_keeps_its_examples_and_pads_less():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(50, 400) for _ in range(64)]
    items = list(range(64))
    grouped = train.group_by_length(items, lengths, group=16)
    for start in range(0, 64, 16):  # the same examples in every optimizer step
        assert sorted(grouped[start:start + 16]) == items[start:start + 16]
    grouped_lengths = [lengths[i] for i in grouped]
    assert train.padding_share(grouped_lengths, 8) < train.padding_share(lengths, 8)
    assert train.padding_share([10, 10, 10, 10], 2) == 0
    assert train.padding_share([10, 30], 2) == pytest.approx(1 - 40 / 60)


@pytest.mark.parametrize("completion", ["letter", "letter_text"])
def test_the_completion_is_rendered_identically_in_training_and_the_evaluations(smoke, completion):
    """06 reads the letter right after the answer prompt, 07 parses the generated text: the
    trained completion puts the gold letter exactly there, and parses back to it."""
    from medqa_zh import answers

    cfg = smoke()
    tokenizer = models.load_tokenizer(cfg.base_model)
    for q in _split(smoke)[:10]:
        q = train.shuffled(q, 0, 0)
        (example,) = train.to_examples([q], completion)
        rendered = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        assert rendered.startswith(prompts.answer_prompt(tokenizer, q.question, q.options) + q.answer_idx)
        content = example["completion"][0]["content"]
        assert answers.extract_letter(content) == q.answer_idx
        expected = prompts.format_answer(q.answer_idx, q.answer if completion == "letter_text" else None)
        assert content == expected
        assert (q.answer in content) == (completion == "letter_text")


@pytest.mark.parametrize(("completion", "loss_on"), [("letter_text", "completion"), ("letter", "all")])
def test_the_loss_covers_what_the_switches_say(smoke, completion, loss_on):
    cfg = smoke(**{"train.completion": completion, "train.loss_on": loss_on, "train.shuffle_options": True})
    run = train.prepare(cfg, "lora")
    for i in range(3):
        view = train.label_view(run, i)
        in_loss = "".join(token for token, counted in view if counted)
        answer = run.examples["train"][i]["completion"][0]["content"]
        if loss_on == "completion":
            assert in_loss == answer + "<|im_end|>\n"
        else:  # every token of the example (the loss reads each from the position before it)
            assert in_loss == "".join(token for token, _ in view) and in_loss.endswith(answer + "<|im_end|>\n")
    assert run.run_key["optimizer"]["completion"] == completion and run.run_key["optimizer"]["shuffle_options"] is True


@pytest.mark.parametrize(("key", "value"), [("completion", "text"), ("loss_on", "prompt"), ("shuffle_options", "yes")])
def test_a_bad_switch_names_the_setting_and_its_choices(smoke, key, value):
    with pytest.raises(ValueError, match=f"train.{key}"):
        train.settings(smoke(**{f"train.{key}": value}), "lora")


def test_a_trainer_built_from_the_parts_is_prepares_and_the_one_train_trains(smoke, monkeypatch):
    """02's cell builds its trainer from train.parts (SFTConfig, LoraConfig, AnswerOnlySFTTrainer), as prepare does
    for the launched processes: the same config and adapter; and train.train trains exactly that trainer object."""
    cfg = smoke(**{"train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2})
    p = train.parts(cfg, "lora", out_dir=cfg.out / "models" / "from-parts")
    args, lora = train.sft_config(p), train.lora_config(p.settings)
    trainer = train.AnswerOnlySFTTrainer(model=p.model, args=args, peft_config=lora, processing_class=p.tokenizer,
                                         train_dataset=p.dataset("train"), eval_dataset=p.dataset("eval"))
    run = train.adopt(p, trainer)
    prepared = train.prepare(cfg, "lora", out_dir=cfg.out / "models" / "from-parts")
    assert prepared.trainer.args.to_dict() == trainer.args.to_dict()
    assert prepared.model.peft_config["default"] == trainer.model.peft_config["default"]
    assert prepared.run_key == run.run_key
    trained = []
    original = train.AnswerOnlySFTTrainer.train
    monkeypatch.setattr(train.AnswerOnlySFTTrainer, "train",
                        lambda self, *a, **kw: trained.append(self) or original(self, *a, **kw))
    metrics = train.train(run, resume=False)
    assert trained == [trainer] and metrics["optimizer_steps"] == 2
    assert [type(c) for c in trainer.callback_handler.callbacks].count(train.JsonlLog) == 1  # adopt's log, once
    # what the trainer was built from, for a script without medqa_zh (tests/technique.py): the rows in training order
    inputs = run.out_dir / runs.INPUTS
    for role in ("train", "eval"):
        rows = [json.loads(line) for line in (inputs / f"{role}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert rows == p.dataset(role).to_list()
    record = json.loads((inputs / "parts.json").read_text(encoding="utf-8"))
    assert record["bookkeeping"] == train.bookkeeping(p) and record["micro"] == p.micro and record["seed"] == p.seed
    # adopt takes a trainer built with trl's own classes too (SFTConfig has no visible_gpus): the notebook's cells
    # with the project's classes swapped for trl's still run through the library's bookkeeping
    plain = SFTTrainer(model=train.parts(cfg, "lora", out_dir=cfg.out / "models" / "trl").model,
                       args=SFTConfig(output_dir=str(cfg.out / "models" / "trl"), max_steps=1, use_cpu=True,
                                      report_to="none"),
                       peft_config=lora, processing_class=p.tokenizer, train_dataset=p.dataset("train"),
                       eval_dataset=p.dataset("eval"))
    assert train.adopt(p, plain).trainer is plain
