"""medqa_zh: the thin library behind the notebooks (one module per concern; docs/ARCHITECTURE.md).

config    load a profile (profiles/base.yaml + the profile's changes), resolve paths, write the manifest
files     write files and folders atomically
steps     the steps a profile turns off: why, the one-line skip, no earlier run's files left; 10's list
data      read and validate MedQA, build splits, the run's split files, SFT / LLaMA-Factory export, textbooks
prompts   the one prompt format shared by training and every evaluation path
answers   read the chosen option letter out of a free-text answer
models    load base models, tokenizers and adapters with clear errors; devices, precisions; the run's models
runs      read a training run's folder (run.json, train_log.jsonl, costs) without the training stack
children  child processes that die with the notebook: start in a process group, stop the group
train     LoRA / full SFT with trl + peft: resumable, logged, measured; in one process or many (accelerate)
dashboards  train.report_to: TensorBoard and trackio, kept equal to train_log.jsonl; the learning curve in them
merge     merge a LoRA adapter into its base and prove merged == base + adapter
grpo      GRPO with trl: the reward (the parsed letter is the gold one), shuffled draws, the grpo model
export    GGUF files (f16, q8_0, Q4_K_M) with llama.cpp's converter and quantizer; the template proof; Modelfiles
serve     start and stop an OpenAI-compatible server (vLLM, transformers or llama.cpp)
serve_child  inside the transformers / llama.cpp server: requests validated, context, queue, streams, OpenAI errors
evaluate  letter scoring, generate-and-parse, the API client, latency; metrics, intervals, paired tests
debias    every cyclic rotation of the options: debiased accuracy, consistency, letter prior
results   each evaluation's answers on disk: resumable caches, the index, collecting them for the report
rag       passages, BM25 / dense / hybrid retrieval, the passages of a prompt
chat      the ipywidgets chat and its backends
report    tables and plots for the notebooks, reports/index.html
tiny      build the tiny smoke model and synthetic MedQA-format data: a planted world, written down before the run
planted   the smoke world's planted effects measured from a run: planted beside found, for each notebook and 10
"""
__version__ = "0.1.0"
