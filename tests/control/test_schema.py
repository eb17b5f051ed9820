"""The compiled body check agrees with the reference JSON Schema validator."""

from hypothesis import given, settings, strategies as st
from jsonschema import Draft202012Validator

from pyflock.control import _schema as s

UUIDS = st.sampled_from(["aaaaaaaa-0000-4000-8000-000000000001", "not-a-uuid",
                         "AAAAAAAA-0000-4000-8000-000000000001", ""])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2 ** 64),
                   st.floats(allow_nan=False, allow_infinity=False), UUIDS,
                   st.text(max_size=300), st.just(67108864), st.just(67108864.0),
                   st.dictionaries(st.text(max_size=300), st.text(max_size=300) | st.integers(),
                                   max_size=18))
BODIES = st.dictionaries(st.sampled_from(["primary", "dataset_id", "maximum_size", "metadata",
                                          "node_uuid", "expires", "other"]),
                         VALUES, max_size=5) | VALUES


PAIRS = [(s.validator(schema), Draft202012Validator(schema))
         for schema in (s.CREATE_DATASET, s.UPDATE_DATASET, s.ACQUIRE_LEASE)]


@settings(max_examples=400, deadline=None)
@given(BODIES)
def test_compiled_check_matches_reference(body):
    """For every schema and body, the fast check accepts exactly what jsonschema accepts."""
    for fast, reference in PAIRS:
        assert fast.is_valid(body) == reference.is_valid(body)
