"""LoRA target modules chosen from the model itself, not from a hard-coded architecture list."""
from .cli import UserError

# The paper adapts the attention query and value projections; these are their names per family.
_QV_NAMES = [("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("c_attn",), ("query_key_value",), ("Wqkv",)]


def default_target_modules(model):
    leaf = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for names in _QV_NAMES:
        if all(n in leaf for n in names):
            return list(names)
    raise UserError(f"cannot find the attention q/v projections of {type(model).__name__}; give --target_modules")
