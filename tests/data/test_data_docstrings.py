"""The standard library's docstrings as real text: deterministic, split by module, filtered."""

from __future__ import annotations

import pytest

from sparseroute.data.docstrings import iter_docstrings, module_split, stdlib_docstrings


def test_the_splits_share_no_module_and_are_deterministic():
    calib = list(iter_docstrings("calib"))
    held = list(iter_docstrings("heldout"))
    assert len(held) >= 512 and len(calib) > len(held)
    assert not {d.module for d in calib} & {d.module for d in held}
    assert all(module_split(d.module) == "calib" for d in calib)
    assert [d.text for d in calib[:50]] == stdlib_docstrings("calib", 50)
    assert stdlib_docstrings("heldout", 20) == stdlib_docstrings("heldout", 20)
    texts = [d.text for d in calib]
    assert len(set(texts)) == len(texts)  # no text twice
    assert min(len(t) for t in texts) >= 40
    # the first texts come from as many modules as there are texts (one per module per round)
    assert len({d.module for d in calib[:100]}) == 100


def test_options_filter_and_cap():
    short = stdlib_docstrings("heldout", 30, min_chars=400)
    assert all(len(t) >= 400 for t in short)
    capped = list(iter_docstrings("heldout", per_module=1))
    assert len({d.module for d in capped}) == len(capped)


@pytest.mark.parametrize("kwargs, needle", [({"split": "test"}, "split must be one of calib, heldout"),
                                            ({"n": 0}, "n must be"), ({"min_chars": 0}, "min_chars"),
                                            ({"heldout_share": 1.5}, "heldout_share"),
                                            ({"n": 10**7}, "asked for n=10000000")])
def test_bad_arguments_say_what_is_wrong(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        stdlib_docstrings(**kwargs)
