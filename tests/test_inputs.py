"""pycoe._inputs: batch size, batched inputs, labels and call shapes of positional and keyword inputs."""

import pytest
import torch

from pycoe._inputs import (
    UnexpectedInputError,
    as_call,
    batch_size,
    batched_names,
    explain_unexpected_keyword,
    map_batched,
    select_inputs,
    split_labels,
)


def test_batch_size_is_the_first_batched_tensor_positional_first():
    assert batch_size((torch.zeros(3, 2),), {"mask": torch.zeros(5, 2)}) == 3
    assert batch_size((2.0, torch.tensor(1.0)), {"input_ids": torch.zeros(4, 7)}) == 4


def test_batch_size_without_a_tensor_names_what_was_received():
    with pytest.raises(TypeError, match=r"the model needs a batch.*got int, mask=str"):
        batch_size((1,), {"mask": "x"})


def test_map_batched_touches_only_the_tensors_of_the_batch():
    args = (torch.arange(4), torch.arange(3), "keep")
    kwargs = {"mask": torch.arange(8).view(4, 2), "scale": torch.tensor(2.0)}
    names = batched_names(args, kwargs, 4)
    assert names == ([0], ["mask"])
    new_args, new_kwargs = map_batched(args, kwargs, lambda t: t[1:3], names)
    assert new_args[0].tolist() == [1, 2] and new_args[1] is args[1] and new_args[2] == "keep"
    assert new_kwargs["mask"].tolist() == [[2, 3], [4, 5]] and new_kwargs["scale"] is kwargs["scale"]


def test_select_inputs_by_position_and_name():
    args, kwargs = (1, 2), {"a": 3, "b": 4}
    assert select_inputs(args, kwargs, None) == ((1, 2), {"a": 3, "b": 4})
    assert select_inputs(args, kwargs, [0, "b", "absent"]) == ((1,), {"b": 4})
    with pytest.raises(IndexError, match="positional input 5"):
        select_inputs(args, kwargs, [5])


def test_split_labels():
    rest, labels = split_labels({"input_ids": 1, "labels": 2})
    assert rest == {"input_ids": 1} and labels == 2
    assert split_labels({"x": 1}) == ({"x": 1}, None)


def test_as_call():
    x = torch.zeros(2)
    assert as_call(x) == ((x,), {})
    assert as_call((x, 1)) == ((x, 1), {})
    assert as_call({"input_ids": x}) == ((), {"input_ids": x})
    with pytest.raises(TypeError, match="mapping whose keys are not all strings"):
        as_call({1: x})
    with pytest.raises(TypeError, match="got int"):
        as_call(3)


def test_unexpected_labels_keyword_says_they_are_targets():
    def forward(x):
        return x

    with pytest.raises(TypeError) as info:
        forward(1, labels=2)
    err = explain_unexpected_keyword(info.value, "experts[0]", {"labels": 2})
    assert err is not None and "labels are the targets" in str(err)
    assert explain_unexpected_keyword(ValueError("x"), "m", {}) is None


def test_an_explained_keyword_error_is_not_explained_twice():
    """A component nested in another (a delegator's backbone inside the CoE's delegator) is named once, innermost."""

    def forward(x):
        return x

    with pytest.raises(TypeError) as info:
        forward(1, mask=2)
    inner = explain_unexpected_keyword(info.value, "the delegator's backbone", {"mask": 2})
    assert isinstance(inner, UnexpectedInputError) and "the delegator's backbone does not take" in str(inner)
    assert explain_unexpected_keyword(inner, "the delegator", {"mask": 2}) is None
