"""Expert storage formats (dense, int8, int4): one byte buffer per expert, unpacked and
dequantized inside the programs that compute with it."""

from jaxmoe.quant.format import DENSE, FORMATS, ExpertFormat, format_of, packed_experts, parse_format
from jaxmoe.quant.quantize import pack_expert, packed_rows, quantize_expert

__all__ = ["DENSE", "FORMATS", "ExpertFormat", "format_of", "pack_expert", "packed_experts", "packed_rows", "parse_format", "quantize_expert"]
