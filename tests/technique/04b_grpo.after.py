# trl's GRPOTrainer, built by 04b's cells in place of grpo.Trainer, and the cell's reward, against the series' run
first = json.loads((OUT / "models" / "grpo" / "checkpoints" / "first_step.json").read_text(encoding="utf-8"))
completions = [[{"role": "assistant", "content": text}] for text in first["texts"]]
rescored = reward_correct(completions, gold=first["gold"], letters=first["letters"])
assert rescored == first["rewards"], "04b: the cell's reward scores the series' first step differently"
# the first two logged steps: sampled from the same seed, the same completions get the same rewards; the second step
# samples from the policy the first step's update made
series = [r for r in read_jsonl(OUT / "models" / "grpo" / "train_log.jsonl") if "reward" in r][:2]
trainer.add_callback(StopAt(series[-1]["step"]))
trainer.train()
ours = [r for r in trainer.state.log_history if "reward" in r]
for theirs, got in zip(series, ours, strict=False):
    assert got["step"] == theirs["step"], (got, theirs)
    for key, tolerance in (("reward", 1e-6), ("frac_reward_zero_std", 1e-6), ("entropy", 1e-3 * theirs["entropy"])):
        assert abs(got[key] - theirs[key]) <= tolerance, f"04b, step {got['step']}: {key} {got[key]} vs the series' {theirs[key]}"
assert len(ours) >= len(series), ours
print(f"04b: the cell's reward gives the series' {len(rescored)} first-step rewards; trl's GRPOTrainer logs the series' "
      + ", ".join(f"step {r['step']} reward {r['reward']:.3f} (entropy {r['entropy']:.4f})" for r in ours[:len(series)]),
      flush=True)
del trainer, p
