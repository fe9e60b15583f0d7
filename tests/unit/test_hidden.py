"""The leak search itself: it must find a secret anywhere but in the gateway's own random ids."""

import uuid

from tests.hidden import hidden_in


def test_a_secret_is_found_in_any_spelling_the_answer_may_carry_it() -> None:
    for text in ("code=F1120", "%3DF1120", '"F1120"', "xF1120y", b"F1120"):
        assert hidden_in(text, ("F1120",)) == ["F1120"], text


def test_a_chance_match_inside_a_minted_id_is_not_a_leak() -> None:
    request_id = "0c9d2f1120ab4e7f8a6b5c4d3e2f1a0b"
    audit_id = str(uuid.UUID("3f2a9c1e-f112-4a0b-9c8d-7e6f5a4b3c2d"))
    assert hidden_in(f"request_id={request_id} audit={audit_id}", ("f1120", "f112")) == []
    assert hidden_in(f"request_id={request_id} code f1120", ("f1120",)) == ["f1120"]
