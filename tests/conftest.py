import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton decides once per process (at its first use) whether it interprets kernels, so the whole
# session runs it in the interpreter unless tests/kernels/test_triton.py is pointed at a GPU.
if os.environ.get("VGS_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_readme_commands for tests in subfolders
