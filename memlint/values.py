"""What the simulation can know about values that fake tensors do not carry.

Fake tensors have shapes, not values, so a data-dependent op must be answered by assumption
(``ValueAssumingMode``). Two kinds of value are known anyway, and make those answers right:

* **Values computed from known values.** ``arange``, ``zeros``, ``ones`` and ``full`` have values
  that do not depend on the data; so does every op on known values alone, which this computes for
  real on small CPU tensors (the indices of a loop over experts, a position table). ``.item()`` on
  such a tensor is then its value, not an assumption: the loop picks the expert it would pick.
* **The share of non-zeros of a one-hot selection.** A router's ``one_hot(top_k_index, E)`` (an
  ``eq`` of unknown indices against a known ``arange(E)``) has exactly one 1 in each row of E, so
  a ``1/E`` share of non-zero elements; views, copies and indexing keep the share, and a ``sum``
  counts them (in expectation). ``nonzero`` of such a tensor gets that share of its elements,
  rounded up, instead of every element (the safe bound for an unknown mask): a mixture of experts
  that loops over its experts (``torch.where(expert_mask[e])``, as Mixtral's code did before
  transformers 5) then gives each expert ``tokens x top_k / E`` tokens, the real total of the
  tokens the experts see whatever the routing, where the bound gave every expert every token (E /
  top_k times too many). A ``sum`` that counts at least one expected non-zero per element is
  assumed non-zero: every expert is hit (``expert_mask.sum(...) > 0``).
* **The range of a random draw.** ``rand`` and ``rand_like`` draw from ``[0, 1)``, so comparing a draw
  with a number outside that range has a known answer. LayerDrop (OPT, BART and others in transformers
  5.17) skips a layer ``if torch.rand([]) < self.layerdrop``, with ``layerdrop`` 0.0 by default: never.
  Answered by the default assumption (True) instead, every layer was skipped and OPT-125m came out
  40% low.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

KNOWN_NUMEL_LIMIT = 1 << 16  # larger tensors are not computed for real (time and memory)
# Values without fake inputs: made from numbers, or from a real tensor lifted into the fake mode (torch.tensor).
_SOURCES = {aten.arange, aten.zeros, aten.ones, aten.full, aten.scalar_tensor, aten.lift_fresh, aten.lift_fresh_copy}
# Ops that move or copy elements without changing which are non-zero (each output from input 0).
_SHARE_KEEPING = {aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.squeeze, aten.unsqueeze,
                  aten.select, aten.slice, aten.transpose, aten.t, aten.clone, aten.expand, aten.detach, aten.alias,
                  aten._to_copy, aten.index, aten.unbind, aten.contiguous}
# Ops whose output elements are some of the input's elements (each output from input 0).
_CHOOSING = (_SHARE_KEEPING - {aten._to_copy}) | {aten.gather, aten.index_select, aten.take}
CHOICES_LIMIT = 256  # more distinct values than this are not tracked
_NONZERO_TESTS = {aten.gt, aten.ne, aten.greater}
_UNIONS = {aten.bitwise_or, aten.logical_or}  # non-zero where either input is
_DRAW_RANGES = {aten.rand: (0.0, 1.0), aten.rand_like: (0.0, 1.0)}  # [low, high) of each element
_ORDER_TESTS = {aten.lt, aten.le, aten.gt, aten.ge}


class ValueKnowledge:
    """Known values and non-zero shares of the fake tensors of one simulation (weakly held)."""

    def __init__(self) -> None:
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> a real tensor of its values
        self.share: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> expected share of non-zeros
        self.count: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> expected value of its elements
        self.bounds: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> [low, high) of its elements
        self.choices: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> the few values it can hold

    def learn(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """After an op: what its outputs' values are, or what share of them is non-zero."""
        facts = _FACTS.get(func) or _facts(func)
        if not (self.values or self.share or self.bounds or self.choices or facts.source or facts.fills
                or facts.packet in _DRAW_RANGES):
            return  # nothing known yet (most CNNs): nothing to learn
        if facts.packet in _DRAW_RANGES and isinstance(out, torch.Tensor):
            self.bounds[out] = _DRAW_RANGES[facts.packet]
            return
        if self._compute(func, facts, args, kwargs, out):
            return
        if facts.mutable:  # an op that wrote into a tensor from unknown values: forget what it held
            put = self._put(args) if facts.packet is aten.index_put_ else None
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    self.values.pop(value, None)
                    self.share.pop(value, None)
                    self.choices.pop(value, None)
            if put is not None:
                share, chosen = put
                if share is not None:
                    self.share[args[0]] = share
                if chosen is not None:
                    self.choices[args[0]] = chosen
            return
        filled = _fill_value(facts.packet, args)
        if filled is not None and isinstance(out, torch.Tensor) and not out.is_floating_point():
            # Too large to compute, its one value is known: tags and masks (integer and boolean tensors;
            # floating ones, such as Adam's state, are left alone, so that a CNN's step learns nothing).
            self.choices[out] = frozenset((filled,))
            self.share[out] = 1.0 if filled else 0.0
            return
        chosen = self._chosen(facts.packet, args)
        if chosen is not None:
            for value in _tensors(out):
                self.choices[value] = chosen
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor):
            return
        packet = facts.packet
        if packet in _SHARE_KEEPING and first in self.bounds:
            for value in _tensors(out):
                self.bounds[value] = self.bounds[first]
        elif packet in _ORDER_TESTS and first in self.bounds and isinstance(out, torch.Tensor) and len(args) > 1:
            answer = _ordered(packet, *self.bounds[first], args[1])
            if answer is not None and out.numel() <= KNOWN_NUMEL_LIMIT:
                with _disable_current_modes():
                    self.values[out] = torch.full(out.shape, answer)
        if packet in _SHARE_KEEPING and first in self.share:
            for value in _tensors(out):
                self.share[value] = self.share[first]
        elif packet is aten.eq and isinstance(out, torch.Tensor) and len(args) > 1:
            self._one_hot(args[0], args[1], out)
        elif packet is aten.sum and first in self.share and isinstance(out, torch.Tensor) and out.numel():
            self.count[out] = self.share[first] * first.numel() / out.numel()
        elif packet in _NONZERO_TESTS and first in self.count and len(args) > 1 and args[1] == 0:
            self.share[out] = min(1.0, self.count[first])
        elif packet in _UNIONS and len(args) > 1 and isinstance(out, torch.Tensor) and out.shape == first.shape:
            shares = [self._share_of(t) for t in args[:2]]
            if None not in shares:  # at most the two together (a sampler's positives | negatives)
                self.share[out] = min(1.0, shares[0] + shares[1])

    def _compute(self, func: Any, facts: "_OpFacts", args: tuple, kwargs: dict, out: Any) -> bool:
        """Run the op for real when every tensor it reads has known values (or it reads none and is a
        source of values); True when it did."""
        outputs = _tensors(out)
        if not outputs or any(o.numel() > KNOWN_NUMEL_LIMIT for o in outputs):
            return False
        if all(_constant(o) is not None for o in outputs):  # FakeTensorMode keeps it (a lifted number): known
            return True
        results = self.computed(func, args, kwargs, facts)
        if results is None or [r.shape for r in results] != [o.shape for o in outputs]:
            return False
        for fake, result in zip(outputs, results):
            self.values[fake] = result
        return True

    def computed(self, func: Any, args: tuple, kwargs: dict, facts: "_OpFacts | None" = None
                 ) -> list[torch.Tensor] | None:
        """The op's outputs computed for real on the known values of every tensor it reads, or None.

        A tensor that is not fake is its own value: ``torch.tensor(data)`` lifts the real tensor of
        the data into the fake mode (a detection model's ground-truth boxes, checked before use).
        """
        facts = facts or _FACTS.get(func) or _facts(func)
        if facts.random:
            return None
        inputs = _tensors((*args, *kwargs.values()))
        if any(_is_fake(t) and self._value_of(t) is None for t in inputs) or (not inputs and not facts.source):
            return None

        def real(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return type(value)(real(v) for v in value)
            return self._value_of(value) if _is_fake(value) else value

        with _disable_current_modes():
            try:
                return _tensors(func(*real(args), **{k: real(v) for k, v in kwargs.items()}))
            except Exception:  # noqa: BLE001 - a value we cannot compute stays unknown
                return None

    def _put(self, args: tuple) -> tuple[float | None, frozenset | None]:
        """What ``tensor[index] = value`` leaves in ``tensor``: at most its non-zeros and the elements
        written (a sampler's mask, ``zeros`` then ``mask[sampled] = 1``), and its values or ``value``."""
        tensor, indices, value = args[0], args[1], args[2]
        written = self._scalar_of(value)
        share = chosen = None
        before = self.choices_of(tensor)
        if written is not None and before is not None:
            chosen = before | {written}
        old = self._share_of(tensor)
        if old is None or not tensor.numel() or len(indices) != 1:
            return share, chosen
        index = indices[0]
        if isinstance(index, torch.Tensor) and index.dtype in (torch.long, torch.int) and tensor.dim() >= 1:
            elements = index.numel() * (tensor.numel() // max(tensor.shape[0], 1))
            share = old if written == 0 else min(1.0, old + elements / tensor.numel())
        return share, chosen

    def _share_of(self, tensor: Any) -> float | None:
        """The share of a tensor's elements that are non-zero, where it is known (or its values are)."""
        if not isinstance(tensor, torch.Tensor):
            return None
        share = self.share.get(tensor)
        if share is None and tensor in self.values and tensor.numel():
            with _disable_current_modes():
                share = float(self.values[tensor].count_nonzero()) / tensor.numel()
        return share

    def _scalar_of(self, value: Any) -> Any:
        """A Python number, or a one-element tensor's value where it is known; else None."""
        if isinstance(value, (int, float, bool)):
            return value
        return self.scalar(value) if isinstance(value, torch.Tensor) else None

    def _chosen(self, packet: Any, args: tuple) -> frozenset | None:
        """The values an op's outputs can hold where they are few: a selection from few values, their
        concatenation, or a remainder by a small number.

        A tensor too large to compute for real may still hold few values: a detection model tags
        each of its 160,000 anchors with its feature level (``torch.full`` per level, ``cat``), then
        selects anchors by score; the selection's levels are some of the five.
        """
        if (packet is aten.remainder and len(args) > 1 and isinstance(args[0], torch.Tensor)
                and not args[0].is_floating_point() and isinstance(args[1], int) and 0 < args[1] <= CHOICES_LIMIT):
            return frozenset(range(args[1]))  # a class from a flat index (RetinaNet's ``index % num_classes``)
        if packet is aten.cat and args and isinstance(args[0], (list, tuple)):
            parts = [self.choices_of(t) if isinstance(t, torch.Tensor) else None for t in args[0]]
            return None if None in parts or not parts else frozenset().union(*parts)
        if packet in _CHOOSING and args and isinstance(args[0], torch.Tensor):
            return self.choices_of(args[0])
        return None

    def choices_of(self, tensor: torch.Tensor) -> frozenset | None:
        """The values ``tensor`` can hold, where they are known to be at most ``CHOICES_LIMIT``; else None."""
        chosen = self.choices.get(tensor)
        if chosen is None and tensor in self.values:
            with _disable_current_modes():
                distinct = self.values[tensor].unique()
                if distinct.numel() <= CHOICES_LIMIT:
                    chosen = frozenset(distinct.tolist())
        return chosen

    def distinct_values(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """``torch.unique(tensor)`` at its largest, where the values it can hold are known: every one of them."""
        chosen = self.choices_of(tensor)
        if chosen is None or len(chosen) > tensor.numel():
            return None
        with _disable_current_modes():
            return torch.tensor(sorted(chosen), dtype=tensor.dtype)

    def _one_hot(self, left: Any, right: Any, out: torch.Tensor) -> None:
        for unknown, known in ((left, right), (right, left)):
            values = self.values.get(known) if isinstance(known, torch.Tensor) else None
            if values is None or values.dim() != 1 or not isinstance(unknown, torch.Tensor) or unknown in self.values:
                continue
            with _disable_current_modes():
                distinct = values.unique().numel() == values.numel()
            if distinct and values.numel() > 1 and unknown.shape[-1:] == (1,):
                self.share[out] = 1.0 / values.numel()
                return

    def _value_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A fake tensor's real value: computed here, or the number FakeTensorMode keeps with it; else None."""
        known = self.values.get(tensor)
        return _constant(tensor) if known is None else known

    def scalar(self, tensor: torch.Tensor) -> Any:
        """The value of a one-element tensor when known (computed here, or a number FakeTensorMode keeps), else None."""
        values = self._value_of(tensor)
        if values is None or values.numel() != 1:
            return None
        with _disable_current_modes():  # a real tensor: read, not turned fake and read again
            return values.item()

    def nonzero_rows(self, tensor: torch.Tensor) -> int | None:
        """Rows of ``nonzero(tensor)`` when its share of non-zeros is known, else None."""
        share = self.share.get(tensor)
        return None if share is None else math.ceil(share * tensor.numel())

    def learn_nonzero(self, tensor: torch.Tensor, out: torch.Tensor) -> None:
        """``nonzero`` of a tensor whose elements are all non-zero: every index, in order."""
        if self.share.get(tensor) == 1.0 and out.numel() <= KNOWN_NUMEL_LIMIT:
            with _disable_current_modes():
                self.values[out] = torch.ones(tensor.shape, dtype=torch.bool).nonzero()


def _ordered(test: Any, low: float, high: float, threshold: Any) -> bool | None:
    """``x < threshold`` (or ``<=``, ``>``, ``>=``) for every x in ``[low, high)``: True, False, or
    None where it depends on x."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        return None
    below = test in (aten.lt, aten.le)
    if threshold >= high:
        return below
    if threshold < low or (threshold == low and test in (aten.lt, aten.ge)):
        return not below
    return None


@dataclass(frozen=True)
class _OpFacts:
    packet: Any
    source: bool  # its values depend on no tensor (arange, zeros, ...)
    fills: bool  # it fills its output with one value (zeros_like, full, ...)
    mutable: bool  # it writes into an argument
    random: bool


_FACTS: dict[Any, _OpFacts] = {}


def _facts(func: Any) -> _OpFacts:
    """What learning needs to know about an op, worked out once per op (a schema lookup is not free)."""
    packet = func.overloadpacket
    facts = _OpFacts(packet, packet in _SOURCES, packet in _FILLS or packet in _FULL_VALUE_AT,
                     func._schema.is_mutable, torch.Tag.nondeterministic_seeded in func.tags)
    _FACTS[func] = facts
    return facts


_FILLS = {aten.zeros: 0, aten.zeros_like: 0, aten.new_zeros: 0, aten.ones: 1, aten.ones_like: 1, aten.new_ones: 1}
_FULL_VALUE_AT = {aten.full: 1, aten.full_like: 1, aten.new_full: 2}  # where the fill value is in the arguments


def _fill_value(packet: Any, args: tuple) -> Any:
    """The one value an op fills its output with (``zeros_like``, ``full``), or None."""
    if packet in _FILLS:
        return _FILLS[packet]
    at = _FULL_VALUE_AT.get(packet)
    value = args[at] if at is not None and len(args) > at else None
    return value if isinstance(value, (int, float, bool)) else None


def _is_fake(value: Any) -> bool:
    return isinstance(value, FakeTensor)


def _constant(tensor: Any) -> torch.Tensor | None:
    """The real value FakeTensorMode keeps with a fake tensor made from a number (``torch.tensor(0.0)``), or None."""
    return getattr(tensor, "constant", None)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an op's output or arguments (one level of lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []
