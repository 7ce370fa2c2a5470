# trl's SFTTrainer, built by 02's cell in place of AnswerOnlySFTTrainer, against the series' LoRA run
TOLERANCE = 0.01  # relative. Step 1 is the base model's loss (LoRA's B starts at zero); the adapter's A is drawn from
                  # the same seed as the series drew it; what is left is the two losses' summation order (measured:
                  # 0.05% at step 10 on 2 CPU cores)
compared = first_losses(trainer, OUT / "models" / "lora")
for step, theirs, ours in compared:
    assert ours is not None and abs(ours - theirs) <= TOLERANCE * abs(theirs), f"02, step {step}: {ours} vs the series' {theirs}"
print("02: trl's SFTTrainer logs the series' first losses: "
      + ", ".join(f"step {step} {ours:.4f} (series {theirs:.4f})" for step, theirs, ours in compared), flush=True)
