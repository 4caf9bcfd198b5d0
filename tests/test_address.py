import pytest

from skyproto.address import (
    NodeName,
    check_handle,
    format_handle,
    harbor_of,
    local_of,
    make_handle,
    parse_handle,
)
from skyproto.errors import AddressError


def test_handle_parts_round_trip():
    handle = make_handle(1, 42)
    assert handle == 0x0100002A
    assert harbor_of(handle) == 1
    assert local_of(handle) == 42
    assert make_handle(255, 2**24 - 1) == 0xFFFFFFFF


def test_text_form_round_trips():
    assert format_handle(make_handle(1, 42)) == ":0100002a"
    assert parse_handle(":0100002a") == make_handle(1, 42)
    assert parse_handle(":FF000001") == make_handle(255, 1)


@pytest.mark.parametrize(("harbor", "local"), [(0, 1), (256, 1), (1, 0), (1, 2**24), (-1, 5)])
def test_out_of_range_parts_are_refused(harbor, local):
    with pytest.raises(AddressError):
        make_handle(harbor, local)


def test_bool_is_not_a_harbor():
    with pytest.raises(AddressError, match="harbor id"):
        make_handle(True, 1)


@pytest.mark.parametrize("text", ["0100002a", ":0100002", ":0100002g", ":00000001", ":01000000",
                                  "", ":-1000000", ":+1000002", ":1_00002a", ": 100002a"])
def test_bad_text_forms(text):
    with pytest.raises(AddressError):
        parse_handle(text)


def test_check_handle_refuses_reserved_parts():
    with pytest.raises(AddressError, match="harbor"):
        check_handle(0x00000001)
    with pytest.raises(AddressError, match="local"):
        check_handle(0x01000000)
    with pytest.raises(AddressError, match="32-bit"):
        check_handle(2**32)


def test_node_names():
    assert str(NodeName.parse("alpha@box")) == "alpha@box"
    assert NodeName.parse("alpha", default_host="h") == NodeName("alpha", "h")
    for bad in ["@box", "a@", "a@b@c", "a b@c"]:
        with pytest.raises(AddressError):
            NodeName.parse(bad)
