"""The workspace of oneDNN's LSTM, which a CPU training step holds and PyTorch's meta kernel leaves empty.

On a CPU, ``nn.LSTM`` trains through oneDNN: ``aten::mkldnn_rnn_layer`` (one call per layer and
direction; aten/src/ATen/native/mkldnn/RNN.cpp) builds a single-layer, single-direction
``lstm_forward`` primitive and, while grad mode is on, returns the primitive's workspace as a
uint8 tensor that autograd saves for the backward. Its size is oneDNN's: the meta kernel returns
an empty one, so an LSTM's training step on a host was estimated at half its real peak and less.

The size follows oneDNN v3.12 (what torch 2.13 bundles), ``rnn_utils::init_conf`` and
``set_workspace_sizes`` (src/cpu/rnn/rnn_utils.hpp) and ``set_offsets`` (rnn_utils.cpp), the same
for its reference and brgemm implementations. It was checked against the workspaces of 207 real
calls (sequence 1-50, batch 1-64, input and hidden sizes 1-300 across the 64-byte and 256-element
alignment edges, 1-3 layers, both directions, with and without bias, fp32, bf16 models and bf16
autocast), with torch 2.13 and 2.14: all equal to the byte. GRU, RNN and LSTMs with projections
do not go through oneDNN.
"""
from __future__ import annotations

PAGE = 4096  # set_offsets: every buffer of the workspace starts on a page
GATES = 4  # an LSTM cell's gates: input, forget, cell, output
ACCUMULATOR = 4  # bytes of gemm_acc_t, fp32 for fp32 and bf16 cells alike (ref_rnn.hpp)


def _rounded(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _good_leading_dimension(elements: int, element_bytes: int) -> int:
    """``rnn_utils::get_good_ld``: a row padded to 64 bytes, and 64 more where it would be a multiple of 256
    elements (4K aliasing)."""
    row = _rounded(elements, 64 // element_bytes)
    return row + 64 // element_bytes if row % 256 == 0 else row


def lstm_workspace_bytes(steps: int, batch: int, input_size: int, hidden: int, element_bytes: int) -> int:
    """Bytes of the workspace of one ``mkldnn_rnn_layer`` call in training, its input (steps, batch, input_size).

    ``element_bytes``: of the input, weights and states (4 for fp32, 2 for bf16; the cell state is
    passed in the input's dtype).
    """
    widest = _good_leading_dimension(max(input_size, hidden), element_bytes)
    widest_accumulated = _good_leading_dimension(max(input_size, hidden), ACCUMULATOR)
    states = 2 * (steps + 1) * batch  # (layers + 1) x (steps + 1) x batch rows, for the one layer
    buffers = (
        steps * batch * _good_leading_dimension(GATES * hidden, element_bytes) * element_bytes,  # ws_gates
        steps * batch * _good_leading_dimension(hidden, element_bytes) * element_bytes,  # ws_ht, even unprojected
        states * widest * element_bytes,  # ws_states_layer (ws_states_iter shares it)
        states * hidden * element_bytes,  # ws_states_iter_c
        states * widest_accumulated * ACCUMULATOR,  # ws_diff_states_layer
        states * widest_accumulated * ACCUMULATOR,  # ws_diff_states_iter
        states * hidden * ACCUMULATOR,  # ws_diff_states_iter_c
    )
    offset = 0
    for size in buffers:
        offset = _rounded(offset, PAGE) + size
    return _rounded(offset, PAGE)  # the empty ws_grid_comp, registered last, starts on a page too
