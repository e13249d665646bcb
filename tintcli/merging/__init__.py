"""Data-free merging methods: plain functions, state dicts in, state dict out.

Each module registers its function in the method registry (``tintcli/methods.py``); the
test-time adaptive methods live with the adaptation code (``tintcli/adaptation/``).
"""

from tintcli.merging.task_arithmetic import task_arithmetic_merge
from tintcli.merging.task_vectors import add_task_vector, task_vector
from tintcli.merging.ties import ties_merge, ties_task_vectors, trim_top_k
from tintcli.merging.weight_averaging import weight_average
from tintcli.methods import MERGE_METHODS, Method, adapt, check_parameters, merge, register

__all__ = ["task_vector", "add_task_vector", "weight_average", "task_arithmetic_merge",
           "ties_merge", "ties_task_vectors", "trim_top_k", "MERGE_METHODS", "Method",
           "register", "check_parameters", "merge", "adapt"]
