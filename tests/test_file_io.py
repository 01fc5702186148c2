"""snapvit_lightning.file_io: files written atomically, never through a link, with the mode of new files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from snapvit_lightning.file_io import staging_path, write_safetensors


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_of_new_files_and_nothing_else_is_left(tmp_path, umask: int) -> None:
    """safetensors itself creates 0600 files: an elastic checkpoint others cannot read. The mode follows the umask."""
    import os
    import stat

    from safetensors.torch import load_file

    from conftest import random_scores, tiny_model
    from snapvit_lightning.elastic import ElasticViT

    old = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "new" / "w.safetensors", {"a": torch.arange(3.0)}, {"k": "v"})
        model, name, kwargs = tiny_model("test_vit")
        ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs).save(tmp_path / "m.elastic.safetensors")
    finally:
        os.umask(old)
    for written in (path, tmp_path / "m.elastic.safetensors"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert torch.equal(load_file(path)["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.elastic.safetensors", "w.safetensors"]
    with pytest.raises(IsADirectoryError, match="is a folder; give a .safetensors file name"):
        write_safetensors(tmp_path / "new", {"a": torch.zeros(1)})


def test_a_safetensors_file_is_written_only_under_its_own_suffix(tmp_path) -> None:
    from conftest import random_scores, tiny_model
    from snapvit_lightning.elastic import ElasticViT

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"path: '.*s.onnx' must end in .safetensors .*ONNX: save_onnx\(\)"):
        elastic.save_subnet(tmp_path / "s.onnx", elastic.subnet(0.3))
    with pytest.raises(ValueError, match=r"path: '.*x.pt' must end in .safetensors \(this writes a safetensors file\)"):
        elastic.save(tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path must be a file path .* got NoneType"):
        elastic.save(None)
    assert list(tmp_path.iterdir()) == []
    staged = staging_path(tmp_path / "m.elastic.safetensors")  # an export's: written under it, then renamed
    assert staged.name.startswith(".m.elastic.safetensors.") and staged.suffix == ".partial"
    elastic.save(staged)
    with pytest.raises(ValueError, match=r"must end in .safetensors"):
        elastic.save(staging_path(tmp_path / "m.pt"))
    assert list(tmp_path.iterdir()) == [staged]
    elastic.save(tmp_path / "upper.SAFETENSORS")  # the suffix in any case, as the reader takes it
    assert ElasticViT.load(tmp_path / "upper.SAFETENSORS").model_name == elastic.model_name


def test_check_writable_creates_nothing_and_refuses_a_folder_it_cannot_create(tmp_path, monkeypatch) -> None:
    from snapvit_lightning.file_io import check_writable

    check_writable(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []  # the probe's folders are removed again
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):  # as /proc does: access() says writable, mkdir fails
        if self.name == "b":
            real_mkdir(self.parent)
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=f"--out: cannot create '{tmp_path / 'a' / 'b'}' \\(Permission denied\\)"):
        check_writable(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []  # 'a', made before 'b' failed, is removed too


def test_check_writable_writes_a_file_into_an_existing_folder(tmp_path, monkeypatch) -> None:
    # root passes os.access everywhere: `-o /proc/x` and `snapvit weights ... /proc/x.safetensors` failed at the write
    import tempfile

    from snapvit_lightning.file_io import check_writable

    def refuse(*args, **kwargs):
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError, match=f"-o: cannot write into '{tmp_path}' \\(No such file or directory\\)"):
        check_writable(tmp_path, "-o")
    monkeypatch.undo()
    check_writable(tmp_path, "-o")
    assert list(tmp_path.iterdir()) == []


def test_files_are_written_under_a_new_name_never_through_a_link(tmp_path):
    # the ONNX and safetensors writers staged at `.NAME.tmp-PID`: a link planted at that predictable name was followed
    from snapvit_lightning.file_io import write_file_atomic

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("mine\n")
    (tmp_path / "out").mkdir()
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old predictable names
        (tmp_path / "out" / f".g.onnx.tmp-{pid}").symlink_to(outside / "victim")
    (tmp_path / "out" / "g.onnx").symlink_to(outside / "victim")
    write_file_atomic(tmp_path / "out" / "g.onnx", b"graph")
    write_safetensors(tmp_path / "out" / "w.safetensors", {"a": torch.zeros(1)})
    assert (outside / "victim").read_text() == "mine\n" and (tmp_path / "out" / "g.onnx").read_bytes() == b"graph"
    assert not (tmp_path / "out" / "g.onnx").is_symlink()
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.is_symlink())
    assert left == ["g.onnx", "w.safetensors"]
