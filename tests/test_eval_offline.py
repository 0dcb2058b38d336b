"""An offline eval backbone is one UsageError line: open_clip's own `ERROR:root:` log line is held back."""
from __future__ import annotations

import logging

import pytest

from common.errors import UsageError


def test_missing_open_clip_weights_give_one_line_and_no_root_error(capfd, caplog):
    from common.eval.clip import load_clip

    root_level = logging.getLogger().level
    with pytest.raises(UsageError) as err:
        load_clip("ViT-B-32", "openai")  # never cached on a test machine; the hub is off (conftest)
    out, errout = capfd.readouterr()
    assert "ERROR:root" not in out + errout
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # open_clip's logging.error held back
    assert "\n" not in str(err.value) and "open_clip ViT-B-32/openai" in str(err.value)
    assert logging.getLogger().level == root_level  # the logger is restored
