# trl's GRPOTrainer, built by 04b's cell in place of grpo.Trainer, and the cell's reward, against the series' run
first = json.loads((OUT / "models" / "grpo" / "checkpoints" / "first_step.json").read_text(encoding="utf-8"))
completions = [[{"role": "assistant", "content": text}] for text in first["texts"]]
rescored = reward_correct(completions, gold=first["gold"], letters=first["letters"])
assert rescored == first["rewards"], "04b: the cell's reward scores the series' first step differently"
series = [r for r in read_jsonl(OUT / "models" / "grpo" / "train_log.jsonl") if "reward" in r]
trainer.add_callback(StopAt(series[0]["step"]))
trainer.train()
ours = next(r for r in trainer.state.log_history if "reward" in r)
assert ours["step"] == series[0]["step"] and abs(ours["reward"] - series[0]["reward"]) < 1e-6, \
    f"04b: trl's GRPOTrainer's first logged reward {ours['reward']} (step {ours['step']}) vs the series' {series[0]}"
print(f"04b: the cell's reward gives the series' {len(rescored)} first-step rewards (mean "
      f"{sum(rescored) / len(rescored):.3f}); trl's GRPOTrainer logs the series' reward at step {ours['step']}: "
      f"{ours['reward']:.3f}", flush=True)
del trainer, p
