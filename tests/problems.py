"""Helpers for tests of validation problems (`SpecError.problems`: "field.path: message")."""


def one_problem_starting(problems: list[str], path: str) -> str:
    """The single problem whose field path is exactly `path`."""
    hits = [p for p in problems if p.startswith(path + ": ")]
    assert len(hits) == 1, f"expected one problem at {path!r}, got {hits} in {problems}"
    return hits[0]
