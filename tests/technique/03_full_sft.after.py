# trl's SFTTrainer, built by 03's cell in place of AnswerOnlySFTTrainer, against the series' full-SFT run
TOLERANCE = 0.01  # relative: no adapter to initialise; the two losses differ in summation order only
compared = first_losses(trainer, OUT / "models" / "full")
for step, theirs, ours in compared:
    assert ours is not None and abs(ours - theirs) <= TOLERANCE * abs(theirs), f"03, step {step}: {ours} vs the series' {theirs}"
print("03: trl's SFTTrainer logs the series' first losses: "
      + ", ".join(f"step {step} {ours:.4f} (series {theirs:.4f})" for step, theirs, ours in compared), flush=True)
del trainer, p
