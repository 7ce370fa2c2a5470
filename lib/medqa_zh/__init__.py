"""medqa_zh: the thin library behind the notebooks (one module per concern).

config   load a profile, resolve paths, write the run manifest
data     read and validate MedQA, build splits, export SFT / LLaMA-Factory files, read textbooks
prompts  the one prompt format shared by training and every evaluation path
models   load the base model, tokenizer and adapters with clear errors; training precision
train    LoRA / full SFT with trl's SFTTrainer + peft: resumable, logged, measured
merge    merge a LoRA adapter into its base and prove merged == base + adapter
answers  read the chosen option letter out of a free-text answer
tiny     build the tiny smoke model and synthetic MedQA-format data
report   tables and plots for the notebooks
"""
__version__ = "0.1.0"
