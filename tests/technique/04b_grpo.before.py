# 04b's parts, read from what the series' GRPO run recorded it was built from (models/grpo/inputs/)
import re
import unicodedata

from trl import GRPOConfig

record = json.loads((OUT / "models" / "grpo" / "inputs" / "parts.json").read_text(encoding="utf-8"))
s, on = record["settings"], True
bookkeeping = {**record["bookkeeping"], "output_dir": str(SCRATCH / "grpo"), "report_to": "none", "disable_tqdm": True}
tokenizer = AutoTokenizer.from_pretrained(record["model"])  # 04's merged model
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
torch.manual_seed(record["seed"])
p = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(record["model"], dtype="auto"), tokenizer=tokenizer,
                    rows=read_jsonl(OUT / "models" / "grpo" / "inputs" / "rows.jsonl"), start=record["model"],
                    precision=record["precision"], seed=record["seed"])
