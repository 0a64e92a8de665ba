"""The trainer's exact score is computed under the run's revision, and says so."""

from __future__ import annotations

import pytest

from soma_models.cli import main
from soma_models.v1 import scoring

from .test_cli import SMALL


@pytest.mark.parametrize("protocol", ["0.1.1", "0.1.7"])
def test_train_protocol_is_the_scores_protocol(corpus, tmp_path, monkeypatch, capsys,
                                                protocol):
    """`Score.protocol` names the revision the run scored under, also when it is not the
    process-wide one (before, the trainer passed the revision's parts but not its name)."""
    seen = []
    compete = scoring.compete

    def recording_compete(*args, **kwargs):
        seen.append(compete(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(scoring, "compete", recording_compete)
    code = main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *SMALL,
                 "--protocol", protocol])
    assert code == 0, capsys.readouterr().err
    assert seen, "the run computed no exact score"
    assert {c.protocol for c in seen} == {s.protocol for c in seen for s in c.scores} == {
        protocol}
