"""The Meta-CoT format (records, text rendering, strict and lenient parsing) and the JSONL data schema.

Import-light: nothing here imports torch or transformers.
"""

from metacot.cot.format import (
    CoTParseError,
    LenientResult,
    MetaCoT,
    MetaTask,
    TargetEntry,
    cot_token_lengths,
    from_dict,
    length_summary,
    parse,
    parse_lenient,
    render,
    to_dict,
)
from metacot.cot.schema import (
    DataError,
    EditRecord,
    UnderstandingRecord,
    load_records,
    validate_scene,
    write_records,
)

__all__ = [
    "DataError",
    "EditRecord",
    "UnderstandingRecord",
    "load_records",
    "validate_scene",
    "write_records",
    "CoTParseError",
    "LenientResult",
    "MetaCoT",
    "MetaTask",
    "TargetEntry",
    "cot_token_lengths",
    "from_dict",
    "length_summary",
    "parse",
    "parse_lenient",
    "render",
    "to_dict",
]
