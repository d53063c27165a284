"""One reader per kind of file a user hands us: damage becomes one line naming the file, never a traceback."""

# Each reader turns the decode, parse, truncation and shape errors of its kind of file into a UserError
# that names the file and says what to do, and refuses a name in a file's metadata that would lead
# outside the directory the file belongs to. Call sites read user files only through these. The
# checkpoint readers (megatron_lite.readers.checkpoint) import torch.distributed and are not re-exported
# here, so that reading a YAML file or a flag stays light.

from megatron_lite.readers.files import (
    file_inside,
    is_plain_name,
    json_loads,
    load_torch_file,
    read_bytes,
    read_json,
    read_text,
    read_yaml,
)

__all__ = [
    "file_inside",
    "is_plain_name",
    "json_loads",
    "load_torch_file",
    "read_bytes",
    "read_json",
    "read_text",
    "read_yaml",
]
