# 03's parts, read from what the series' full-SFT run recorded (models/full/inputs/); 02's piece defined sft_parts
del trainer, p  # 02's model, before 03's loads
s, bookkeeping, p = sft_parts(OUT / "models" / "full", SCRATCH / "full")
