"""
Checks a .pt2 archive before torch.export.load sees it, reading it as a zip of JSON
and raw bytes (no pickle, no torch deserializer). torch.export.load would run code
from a hostile archive in several places (see engines/forward_file.py, _load_torch); an
archive passes here only if every one of those paths is closed:

- members: only the files torch.export.save writes for one program named "model"
  (no legacy .pt pickles, no AOTInductor libraries, no custom or opaque objects);
- weights and constants: raw tensor bytes only (use_pickle false);
- sample inputs: loadable by torch.load(weights_only=True), so torch never falls back
  to the unrestricted unpickler;
- graph: every node calls a pure tensor operator from an allow-list (engines.opsets:
  no operator that reads or writes files, draws random numbers or touches memory it
  was not given), sym-int arithmetic on sizes, or a few structural higher-order ops;
  the program writes no buffer and no input (no state carried between calls);
- shapes: every expression torch would sympify is arithmetic over shape symbols, and
  every guard torch would exec compares an input size with an integer.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

from engines.opsets import FORWARD_RULES, SYM_OPS, TORCH_OPS

CONTRACT_FILE = "arun_contract.json"   # inside a .pt2: extra/arun_contract.json; in .mlxfn: the metadata string


class ArtifactError(Exception):
    """The artifact cannot be written, read or trusted; the message names the problem and the fix."""

_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    rf"|extra/{re.escape(CONTRACT_FILE)})")
_ATEN_OP = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.[A-Za-z0-9_]+")
_STRUCTURAL_OPS = {"_operator.getitem", "torch.ops.higher_order.wrap_with_set_grad_enabled",
                   "torch.ops.higher_order.wrap_with_autocast"}
# sympy.Symbol as torch prints it, e.g. Symbol('s95', positive=True, integer=True)
_SYMBOL = re.compile(r"Symbol\('[a-z]+\d+'(?:,\s*(?:positive|integer|nonnegative|real|finite)=(?:True|False))*\)")
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
# sympify resolves these names to sympy classes and torch's own shape functions: arithmetic,
# comparisons and boolean connectives only (slices and flattened heads print as Mul/Add).
_SYMPY_FUNCTIONS = {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
                    "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "Max", "Min", "Abs", "Integer",
                    "Mul", "Add", "Pow", "Rational", "TruncToInt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
                    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
                    "And", "Or", "Not", "true", "false"}
_GUARD = re.compile(r"L\['[A-Za-z_]\w*'\]\.size\(\)\[\d+\]\s*(==|<=|>=|<|>|!=)\s*-?\d+")


def _refuse(what: str) -> ArtifactError:
    return ArtifactError(f"unsafe or malformed .pt2: {what}; export the forward with engines.forward_file.export_forward")


def _refuse_op(op: str, why: str = "") -> ArtifactError:
    return ArtifactError(f"INVALID: the exported forward calls {op}, which is not on the allow-list of pure tensor "
                         f"operators{why}; change the forward in the train file to avoid it ({FORWARD_RULES})")


def check_target(target: Any) -> None:
    """One graph node's operator: an allowed ATen op, sym-int arithmetic, or a structural wrapper."""
    if not isinstance(target, str):
        raise _refuse(f"graph node target {str(target)[:80]!r} is not an operator name")
    aten = _ATEN_OP.fullmatch(target)
    if aten:
        if aten.group(1) not in TORCH_OPS:
            raise _refuse_op(f"aten.{aten.group(1)}")
        return
    if target not in SYM_OPS and target not in _STRUCTURAL_OPS:
        raise _refuse_op(repr(target[:80]), " (not an ATen op)")


def check_expression(expr: str) -> None:
    """Arithmetic over shape symbols only: no names sympify could resolve to anything else."""
    rest = _SYMBOL.sub("s0", expr)
    if not re.fullmatch(r"[A-Za-z0-9_\s+\-*/(),]*", rest):
        raise _refuse(f"shape expression {expr[:80]!r} has characters beyond arithmetic")
    for name in re.findall(r"[A-Za-z_]\w*", rest):
        if name not in _SYMPY_FUNCTIONS and not _SYMBOL_NAME.fullmatch(name):
            raise _refuse(f"shape expression {expr[:80]!r} names {name!r}")


def _walk(node: Any) -> None:
    """Every graph node (nested graphs included) and every sympified string."""
    if isinstance(node, dict):
        if "target" in node and "inputs" in node:
            check_target(node["target"])
        for key, value in node.items():
            if key in ("as_custom_obj", "custom_obj_values") and value:
                raise _refuse("the graph holds a custom (torchbind) object")
            if key == "expr_str":
                check_expression(str(value))
            _walk(value)
    elif isinstance(node, list):
        for value in node:
            _walk(value)


def _check_payloads(zf: zipfile.ZipFile, name: str, prefix: str) -> None:
    try:
        config = json.loads(zf.read(name))["config"]
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _refuse(f"{name} is not a payload config ({type(e).__name__})") from e
    for fqn, meta in config.items():
        if meta.get("use_pickle") is not False:
            raise _refuse(f"{fqn} is stored as a pickle")
        if not re.fullmatch(prefix + r"\d+", str(meta.get("path_name", ""))):
            raise _refuse(f"{fqn} is stored as {str(meta.get('path_name'))[:40]!r}, not a raw tensor")


def _check_sample_inputs(data: bytes) -> None:
    import torch
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # anything the restricted unpickler refuses is refused here
        raise _refuse(f"sample inputs are not plain tensors ({type(e).__name__})") from e


def check_pt2(data: bytes) -> dict:
    """Raises ArtifactError unless `data` is a .pt2 that loads without running code; returns its contract."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"not a .pt2 archive ({type(e).__name__}: {e}); re-export the forward") from e
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _refuse(f"{len(roots)} top-level folders, expected one")
    root = roots.pop() + "/"
    for n in names:
        if not _MEMBERS.fullmatch(n[len(root):]):
            raise _refuse(f"unexpected member {n[len(root):][:80]!r}")
    try:
        _check_payloads(zf, root + "data/weights/model_weights_config.json", "weight_")
        _check_payloads(zf, root + "data/constants/model_constants_config.json", "tensor_")
        _check_sample_inputs(zf.read(root + "data/sample_inputs/model.pt"))
        program = json.loads(zf.read(root + "models/model.json"))
        contract = json.loads(zf.read(root + f"extra/{CONTRACT_FILE}"))
    except KeyError as e:
        raise _refuse(f"missing member {e}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a truncated member, a bad CRC
        raise ArtifactError(f"corrupt .pt2 archive ({type(e).__name__}: {e}); re-export the forward") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _refuse(f"a JSON member does not parse ({type(e).__name__})") from e
    for guard in program.get("guards_code") or []:
        if not _GUARD.fullmatch(str(guard)):
            raise _refuse(f"guard {str(guard)[:80]!r} is not a size comparison")
    for key in (program.get("range_constraints") or {}):
        check_expression(str(key))
    _check_signature(program)
    _walk(program)
    return contract


def _check_signature(program: dict) -> None:
    """Inputs are the tokens, weights and constants; the only output is the logits. A buffer or input
    the program writes would carry state from one call to the next (or into the evaluator's rows)."""
    signature = (program.get("graph_module") or {}).get("signature") or {}
    for spec in signature.get("input_specs") or []:
        kind = next(iter(spec), "?") if isinstance(spec, dict) else "?"
        if kind not in ("user_input", "parameter", "buffer", "tensor_constant"):
            raise _refuse_op(f"an input of kind {kind!r}", " (side effects need effect tokens or custom objects)")
    for spec in signature.get("output_specs") or []:
        kind = next(iter(spec), "?") if isinstance(spec, dict) else "?"
        if kind != "user_output":
            raise ArtifactError(f"INVALID: the exported forward writes state ({kind}: a buffer, parameter or input "
                                f"updated in place); change the forward in the train file so it only returns "
                                f"logits ({FORWARD_RULES})")
