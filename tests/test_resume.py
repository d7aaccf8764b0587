import pytest
import yaml

from loravl.config import ConfigError, RunConfig
from loravl.resume import check_resume


def _checkpoint(folder, tree: dict):
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(tree))
    return folder


def test_a_run_saved_before_same_caption_positives_resumes_only_as_it_trained(tmp_path):
    """A checkpoint whose config.yaml predates model.loss.same_caption_positive trained with ALBEF's image-id
    positives: resuming it with today's default would change its loss, so the resume names the setting; given
    the setting it trained with, it resumes."""
    tree = RunConfig().to_dict()
    del tree["model"]["loss"]["same_caption_positive"]
    old = _checkpoint(tmp_path / "old", tree)
    with pytest.raises(ConfigError, match=r"model.loss.same_caption_positive \(False -> True\)"):
        check_resume(old, RunConfig(), 1, 1, at_epoch_end=True)
    as_trained = RunConfig()
    as_trained.model.loss.same_caption_positive = False
    assert check_resume(old, as_trained, 1, 1, at_epoch_end=True) == {}
    # A checkpoint that wrote the setting is compared as written.
    assert check_resume(_checkpoint(tmp_path / "new", RunConfig().to_dict()), RunConfig(), 1, 1,
                        at_epoch_end=True) == {}
