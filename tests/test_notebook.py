"""The workshop notebook, executed top to bottom by a real Jupyter kernel, as a student runs it."""

import ast
import builtins
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "gemma3_tinystories.ipynb"


def tagged(nb, tag: str):
    cells = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected"
    return cells[0]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:  # outputs stay out of git, so that diffs show only what changed in the notebook
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_a_mistyped_stories_path_stops_the_settings_cell(tmp_path, monkeypatch):
    """TINYGEMMA_STORIES naming nothing (a typo) fell back to the Hugging Face hub without a word: online a
    student trained on other stories than asked, offline met a hub error pointing away from the typo."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(cell.source for cell in nb.cells if cell.cell_type == "code" and "TINYGEMMA_STORIES" in cell.source)
    monkeypatch.setenv("TINYGEMMA_WORKDIR", str(tmp_path))
    monkeypatch.setenv("TINYGEMMA_STORIES", str(tmp_path / "trian.txt"))
    with pytest.raises(SystemExit, match=f"TINYGEMMA_STORIES={tmp_path / 'trian.txt'} does not exist"):
        exec(settings, {})
    (tmp_path / "train.txt").write_text("Once upon a time.\n")
    monkeypatch.setenv("TINYGEMMA_STORIES", str(tmp_path / "train.txt"))
    names = {}
    exec(settings, names)
    assert names["SOURCE"] == str(tmp_path / "train.txt")


def python_of(cell_source: str) -> str:
    """A code cell as plain Python: its shell lines (`!pip ...`, with their continuation lines) become `pass`."""
    lines, continued = [], False
    for line in cell_source.splitlines():
        first = not continued and line.lstrip().startswith("!")
        shell = continued or first
        continued = shell and line.rstrip().endswith("\\")
        lines.append(re.match(r"\s*", line).group() + "pass" if first else "" if shell else line)
    return "\n".join(lines)


def test_each_cell_imports_what_it_uses():
    """After a restart (a Colab disconnect) a student reruns the settings cell and the cell they were at, not the
    pictures between: the train cell drew its plot with the `plt` of the sliding-window picture's cell, and the
    export cell called `tinygemma.load` imported three sections before, both a NameError then."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    trees = [ast.parse(python_of(cell.source)) for cell in nb.cells if cell.cell_type == "code"]
    imported = [{(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names} for tree in trees]
    anywhere = set().union(*imported)
    for tree, own in zip(trees, imported, strict=True):
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert (used & anywhere) <= own, (sorted((used & anywhere) - own), ast.unparse(tree)[:200])


def test_the_install_text_names_an_extra_that_brings_what_the_notebook_imports():
    """Outside Colab a student installs what the install cell's text names: that extra, with the package's own
    dependencies, must hold every third-party module a cell imports, Jupyter, and ipywidgets (for the training cell's
    tqdm.auto bar: without it tqdm warns "IProgress not found" and prints a text bar)."""
    import tomllib

    nb = nbformat.read(NOTEBOOK, as_version=4)
    extra = re.search(r'pip install -e "\.\[(\w+)\]"', nb.cells[1].source)
    assert extra, nb.cells[1].source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"][extra.group(1)]
    installed = {re.split(r"[<>=~!;\[ ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}
    trees = [ast.parse(python_of(cell.source)) for cell in nb.cells if cell.cell_type == "code"]
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for tree in trees for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names if not (isinstance(node, ast.ImportFrom) and node.level)}
    # (google: Colab's own; IPython: the kernel's, which Jupyter brings)
    third_party = imported - set(sys.stdlib_module_names) - {"tinygemma", "google", "IPython"}
    assert third_party and third_party <= installed, sorted(third_party - installed)
    assert {"ipywidgets", "jupyterlab"} <= installed, sorted(installed)


def assigned_names(tree) -> set[str]:
    """The names a cell binds: assignments, imports, functions, classes and their arguments, loop variables."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_each_cell_from_training_on_needs_only_the_settings_after_a_restart():
    """After a restart a student runs the settings cell and the cell they were at. From training on, each cell
    reads the run from disk itself: the evaluation cell used the data of section 2 and the model of the generate
    cell, and the export cell the generate cell's prompt, a NameError after a restart (the export already
    written)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    trees = [ast.parse(python_of(cell.source)) for cell in code]
    settings = next(i for i, cell in enumerate(code) if "TINYGEMMA_STORIES" in cell.source)
    given = assigned_names(trees[0]) | assigned_names(trees[settings]) | set(dir(builtins))
    first = code.index(tagged(nb, "train"))
    assert first > settings
    for cell, tree in zip(code[first:], trees[first:], strict=True):
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert used <= given | assigned_names(tree), (sorted(used - given - assigned_names(tree)), cell.source[:80])


def test_the_prepare_cell_runs_after_a_restart_without_section_1():
    """After a restart, the settings cell and the prepare cell: the prepare cell printed section 1's story, a
    NameError once the data was prepared."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    settings = next(i for i, cell in enumerate(code) if "TINYGEMMA_STORIES" in cell.source)
    prepare = next(cell for cell in code if "prepare(DATA" in cell.source)
    tree = ast.parse(python_of(prepare.source))
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    given = assigned_names(ast.parse(python_of(code[settings].source))) | set(dir(builtins))
    assert used <= given | assigned_names(tree), sorted(used - given - assigned_names(tree))


def test_the_cells_after_training_leave_the_untrained_model_alone():
    """Section 3's `model` is the untrained one, whose loss its cell prints beside ln(vocabulary): bound again to
    the trained checkpoint by section 5, that cell run again printed the trained loss as the untrained one (and
    on a GPU failed: the checkpoint's weights on the GPU, the window on the CPU). Only the workshop cell lets go
    of it, to free the GPU."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code[code.index(tagged(nb, "train")):]:
        for node in ast.walk(ast.parse(python_of(cell.source))):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "model" for t in node.targets):
                assert isinstance(node.value, ast.Constant) and node.value.value is None, cell.source[:80]


def test_another_vocabulary_is_prepared_anew(tmp_path, monkeypatch):
    """Changing VOCAB_SIZE in the settings cell kept the data folder (named by tokenizer, source and limit) and its
    4,096-token BPE: the run resumed on it. Another vocabulary names a folder of its own; the CPU's 4,096 keeps
    the name data prepared before had (a run begun before then resumes)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(cell.source for cell in nb.cells if cell.cell_type == "code" and "TINYGEMMA_STORIES" in cell.source)
    monkeypatch.setenv("TINYGEMMA_WORKDIR", str(tmp_path))
    monkeypatch.delenv("TINYGEMMA_STORIES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert '"gemma3-tiny", "bpe", 4096' in settings
    chosen = {}
    for vocab in (4096, 8192, None):  # (None: prepare's default, 8,192, named apart from the 4,096 it is not)
        names = {}
        exec(settings.replace('"gemma3-tiny", "bpe", 4096', f'"gemma3-tiny", "bpe", {vocab}'), names)
        chosen[vocab] = names["DATA"], names["RUN"]
    assert [chosen[vocab][0].name for vocab in (4096, 8192, None)] == [
        "data-hub-bpe-5000", "data-hub-bpe-8192-5000", "data-hub-bpe-default-5000"]
    assert len({run for _, run in chosen.values()}) == 3


def test_the_training_cell_trains_only_the_chunks_past_the_runs_checkpoint(tmp_path, monkeypatch):
    """Run again on a finished run, or after a disconnect at chunk k, the cell called train() for every chunk from
    the first: each call loads the checkpoint and builds the model and the optimizer (for the 270M, 1.2 GB read,
    from Drive with a frozen bar) to train nothing. It starts at the first chunk past the checkpoint."""
    import json

    import tinygemma.checkpoint
    import tinygemma.train

    nb = nbformat.read(NOTEBOOK, as_version=4)
    calls = []

    def fake_train(recipe, resume, stop_at, quiet):
        calls.append(stop_at)
        return {"step": stop_at, "val_loss": 3.0, "best_val_loss": 3.0, "best_step": stop_at, "tokens": 1,
                "elapsed_s": 1.0}

    monkeypatch.setattr(tinygemma.train, "train", fake_train)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 4.0}) + "\n")
    settings = {"RUN": run, "DATA": tmp_path, "MODEL": "gemma3-tiny", "MAX_STEPS": 30, "BATCH_SIZE": 4,
                "BLOCK_SIZE": 32, "GRAD_ACCUM": 1, "OPTIMIZER": "muon", "LR_SCHEDULE": "wsd", "LEARNING_RATE": 1e-3,
                "MUON_LEARNING_RATE": 0.04}
    for done, expected in [(None, list(range(3, 31, 3))), (12, [15, 18, 21, 24, 27, 30]), (30, [30])]:
        monkeypatch.setattr(tinygemma.checkpoint, "checkpoint_pointer",
                            lambda run_dir, name="last", done=done: None if done is None else {"step": done})
        calls.clear()
        exec(python_of(tagged(nb, "train").source), dict(settings))
        assert calls == expected, done


def test_other_stories_are_prepared_anew_not_read_from_another_files_tokens(tmp_path, monkeypatch):
    """The prepared data's folder was named by the tokenizer and the story limit alone: pointing
    TINYGEMMA_STORIES at another file printed that file's first story, then trained on the first file's tokens
    and resumed its run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(cell.source for cell in nb.cells if cell.cell_type == "code" and "TINYGEMMA_STORIES" in cell.source)
    monkeypatch.setenv("TINYGEMMA_WORKDIR", str(tmp_path))
    chosen = []
    for name in ("a.txt", "b.txt", "a.txt"):
        (tmp_path / name).write_text("Once upon a time.\n")
        monkeypatch.setenv("TINYGEMMA_STORIES", str(tmp_path / name))
        names = {}
        exec(settings, names)
        chosen.append((names["DATA"], names["RUN"]))
    assert chosen[0] == chosen[2]  # the same file: the same data and run (a restart resumes)
    assert chosen[0][0] != chosen[1][0] and chosen[0][1] != chosen[1][1]
    monkeypatch.delenv("TINYGEMMA_STORIES")
    names = {}
    exec(settings, names)
    assert names["DATA"] not in {data for data, _ in chosen}  # the hub's stories: a folder of their own


def test_colab_work_folder_does_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    """The install cell changes into the checkout's notebooks/; a restarted runtime starts in /content, and a
    student who skips the install cell (the package is installed) got a relative WORK elsewhere: the data
    prepared again and the run started over at step 0 instead of resuming."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(cell.source for cell in nb.cells if cell.cell_type == "code" and "TINYGEMMA_STORIES" in cell.source)
    monkeypatch.delenv("TINYGEMMA_WORKDIR", raising=False)
    monkeypatch.delenv("TINYGEMMA_STORIES", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    runs = []
    for folder in (tmp_path / "content", tmp_path / "content" / "tinygemma-src" / "notebooks"):
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(folder)
        names = {}
        exec(settings, names)
        runs.append(names["RUN"])
    assert runs[0] == runs[1] and runs[0].is_absolute(), runs


def test_notebook_runs_top_to_bottom(tmp_path, stories_dir):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        **os.environ,
        # This checkout's package, whatever is installed (in CI, the same checkout installed editable).
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "TINYGEMMA_STORIES": str(stories_dir / "train.txt"),  # offline: the stories from ../shared
        "TINYGEMMA_WORKDIR": str(tmp_path),
        "TINYGEMMA_NOTEBOOK_QUICK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # One thread: beside pytest and other work on a shared machine, two OpenMP threads spinning on two busy
        # cores ran this notebook 4x slower (586 s against 149 s, load average 6-8 on 2 cores).
        "OMP_NUM_THREADS": "1",
    }
    # What section 5 scored in: `tinygemma eval`'s precision (float32 on a CPU, whose own auto is bfloat16 with
    # AVX-512 BF16 or AMX), so that its figures are the command's
    evaluating = next(i for i, cell in enumerate(nb.cells) if "metrics = evaluate(" in cell.source)
    nb.cells.insert(evaluating + 1, nbformat.v4.new_code_cell("print('scored in', trained.embed_tokens.weight.dtype)"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell raises
    from tinygemma.devices import evaluation_dtype, pick_device, pick_dtype

    scored = pick_dtype(evaluation_dtype("auto", pick_device()), pick_device())  # (bfloat16 on most GPUs)
    assert nb.cells[evaluating + 1].outputs[0].text == f"scored in {scored}\n"

    training = tagged(nb, "train")
    assert any("image/png" in output.get("data", {}) for output in training.outputs), "no loss plot"
    runs = list(tmp_path.glob("run-*"))
    assert len(runs) == 1 and (runs[0] / "loss.png").stat().st_size > 1000

    printed = "".join(o.text for o in tagged(nb, "generate").outputs if o.output_type == "stream" and o.name == "stdout")
    story = printed.split("\n\n(")[0]
    assert story.startswith("Once upon a time"), printed  # the notebook prints the prompt, then what came after it
    assert len(story.removeprefix("Once upon a time").split()) > 10, printed

    exported = "".join(o.text for o in tagged(nb, "export").outputs if o.output_type == "stream")
    assert "the same tokens from tinygemma: True" in exported, exported  # transformers and tinygemma agree


def test_colab_install_cell_asks_for_the_repository_before_anything(tmp_path):
    """On Colab (faked here) with REPO unset, the install cell stops with what to do, cloning nothing."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = next(cell for cell in nb.cells if cell.cell_type == "code" and "google.colab" in cell.source)
    fake_colab = nbformat.v4.new_code_cell('import sys, types\nsys.modules["google.colab"] = types.ModuleType("google.colab")')
    nb.cells = [fake_colab, install]
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="set REPO in this cell"):
        client.execute()
    assert list(tmp_path.iterdir()) == []


def test_colab_install_cell_copies_a_folder_given_as_repo(tmp_path):
    """REPO may be a copy of the repository on Drive without .git (an unpacked ZIP): copied, not git-cloned (it
    was cloned, and failed); a folder that is not one is said in one line. (CHECKOUT and pip faked: no /content.)"""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    copy, checkout = tmp_path / "unpacked zip", tmp_path / "checkout"
    (copy / "notebooks").mkdir(parents=True)
    (copy / "pyproject.toml").write_text("[project]\nname = 'tinygemma'\n")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = next(cell for cell in nb.cells if cell.cell_type == "code" and "google.colab" in cell.source)
    fake_colab = nbformat.v4.new_code_cell('import sys, types\nsys.modules["google.colab"] = types.ModuleType("google.colab")')
    for repo, error in ((copy, None), (tmp_path / "drive not mounted", "holds no pyproject.toml")):
        source = install.source.replace('REPO = ""', f"REPO = {str(repo)!r}")
        source = source.replace('Path("/content/tinygemma-src")', f"Path({str(checkout)!r})")
        source = source.replace("!pip install -q {CHECKOUT}", "print('pip install', CHECKOUT)")
        assert source.count(str(repo)) == 1 and source.count(str(checkout)) == 1 and "!pip" not in source
        nb.cells = [fake_colab, nbformat.v4.new_code_cell(source)]
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        if error is None:
            client.execute()
            assert (checkout / "pyproject.toml").read_text() == (copy / "pyproject.toml").read_text()
            shutil.rmtree(checkout)
        else:
            with pytest.raises(nbclient.exceptions.CellExecutionError, match=error):
                client.execute()
            assert not checkout.exists()
