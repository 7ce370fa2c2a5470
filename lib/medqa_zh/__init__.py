"""medqa_zh: the thin library behind the notebooks (one module per concern).

config   load a profile, resolve paths, write the run manifest
data     read and validate MedQA, build splits, export SFT / LLaMA-Factory files, read textbooks
prompts  the one prompt format shared by training and every evaluation path
tiny     build the tiny smoke model and synthetic MedQA-format data
report   tables and plots for the notebooks
"""
__version__ = "0.1.0"
