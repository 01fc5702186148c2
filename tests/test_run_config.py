"""SaveConfigAfterFit: the config a `snapvit fit` ran, written beside its export."""

from __future__ import annotations

import pickle

import pytest
import yaml
from test_cli import _image_folder

from snapvit_lightning.cli import main
from snapvit_lightning.errors import one_line_error_parser
from snapvit_lightning.run_config import CONFIG_MARK, SaveConfigAfterFit


def _fit(photos, out, *extra: str) -> list[str]:
    return ["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir", str(photos),
            "--data.batch_size", "2", "--data.num_local_crops", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
            "--trainer.callbacks+=snapvit_lightning.export.ElasticExport", "--trainer.callbacks.dirpath", str(out),
            "--trainer.callbacks.correct", "none", *extra]


def test_the_callback_pickles_for_ddp_spawn() -> None:
    # ddp_spawn pickles the Trainer's callbacks: the parser (a class made at run time) failed,
    # "Can't pickle local object 'one_line_error_parser.<locals>.OneLineErrorParser'"
    parser = one_line_error_parser()()
    parser.add_argument("--x", type=int, default=3)
    callback = SaveConfigAfterFit(parser, parser.parse_args([]))
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.parser is None and yaml.safe_load(copy.text) == {"x": 3} and copy.text.startswith(CONFIG_MARK)


def test_a_config_yaml_beside_the_export_is_kept_unless_overwrite(tmp_path, capsys) -> None:
    # a user's own config.yaml in the export folder was replaced without a word, overwrite false
    photos = _image_folder(tmp_path / "photos", n=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("# mine\n")
    with pytest.raises(SystemExit) as stop:
        main(_fit(photos, tmp_path / "out"))
    assert stop.value.code == 2
    assert "config.yaml exists (a config of yours, or an earlier fit's?)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]  # refused before the fit
    main(_fit(photos, tmp_path / "out", "--trainer.callbacks.overwrite", "true"))
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["model"]["model"] == "test_vit"


def test_the_main_jobs_config_path_is_refused_too(tmp_path) -> None:
    # the main job passes its config's path: a user's config.yaml there was replaced with overwrite false
    from snapvit_lightning.cli import SnapViTCLI

    photos = _image_folder(tmp_path / "photos", n=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("mine: 1\n")
    with pytest.raises(FileExistsError, match=r"config.yaml exists \(a config of yours, or an earlier fit's\?\)"):
        SnapViTCLI.run(_fit(photos, tmp_path / "out"), save_config=tmp_path / "out" / "config.yaml")
    assert (tmp_path / "out" / "config.yaml").read_text() == "mine: 1\n"


def test_an_overwriting_export_removes_an_earlier_fits_config_but_not_a_users(tmp_path) -> None:
    # the plug-in (which saves no config) overwrote an export and left the earlier fit's config.yaml beside it
    import torch
    from conftest import random_scores, tiny_model

    from snapvit_lightning.elastic import ElasticViT
    from snapvit_lightning.export import export_elastic

    photos = _image_folder(tmp_path / "photos", n=4)
    main(_fit(photos, tmp_path / "out"))
    assert (tmp_path / "out" / "config.yaml").read_text().startswith(CONFIG_MARK + "\n# lightning.pytorch==")
    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    images = torch.randn(2, 3, 160, 160)
    export_elastic(elastic, tmp_path / "out", budgets=[0.5], fitness_images=images, correct="none", overwrite=True)
    assert not (tmp_path / "out" / "config.yaml").exists()
    for mine in ("mine: 1\n", "# lightning.pytorch==2.6.6\nmine: 1\n"):  # not a fit's, a user's LightningCLI dump too: kept
        (tmp_path / "out" / "config.yaml").write_text(mine)
        export_elastic(elastic, tmp_path / "out", budgets=[0.5], fitness_images=images, correct="none", overwrite=True)
        assert (tmp_path / "out" / "config.yaml").read_text() == mine


def test_the_config_names_what_precision_auto_chose(tmp_path) -> None:
    # the saved config keeps `auto`, so a re-run probes again and may choose otherwise: the choice was nowhere in it
    from types import SimpleNamespace

    from snapvit_lightning.run_config import _resolved_precision
    from snapvit_lightning.search import EvolutionarySearch

    photos = _image_folder(tmp_path / "photos", n=4)
    argv = _fit(photos, tmp_path / "out")
    argv[argv.index("32-true")] = "auto"
    assert main(argv) == 0
    text = (tmp_path / "out" / "config.yaml").read_text()
    chosen = yaml.safe_load((tmp_path / "out" / "report.json").read_text())["build_times"]["precision"]["trainer_precision"]
    assert text.endswith(f"\n# precision: auto chose trainer.precision {chosen} on this machine (report.json: "
                         "build_times.precision); running this config again probes again: give them to repeat this "
                         "run's choice\n")
    assert yaml.safe_load(text)["trainer"]["precision"] == "auto"
    probe = {"trainer_precision": "bf16-mixed", "search_autocast": "bfloat16"}
    module = SimpleNamespace(precision_probe=probe)
    for autocast, said in (("auto", " and the search's autocast bfloat16 on"), (False, "bf16-mixed on")):
        trainer = SimpleNamespace(callbacks=[EvolutionarySearch(autocast=autocast)])
        assert said in _resolved_precision(trainer, module)
    assert _resolved_precision(trainer, SimpleNamespace(precision_probe=None)) == ""  # a precision given: nothing to say
