"""The package's task metadata (__init__.py) against matbench's own."""

from matbench.metadata import mbv01_metadata

from mat_bench import ALL_TASKS, CLASS_THRESHOLD, METRICS, STRUCTURE_TASKS, TASK_INFO


def test_task_info_matches_matbench_metadata():
    assert set(TASK_INFO) == {k for k in mbv01_metadata if k.startswith("matbench_")}
    for task, info in TASK_INFO.items():
        meta = mbv01_metadata[task]
        assert info == (meta["target"], meta["task_type"], meta["input_type"]), task
        assert info.metric == {"regression": "mae", "classification": "rocauc"}[
            meta["task_type"]]
    sizes = [mbv01_metadata[task]["n_samples"] for task in ALL_TASKS]
    assert sizes == sorted(sizes)  # smallest to largest
    assert STRUCTURE_TASKS == tuple(t for t in ALL_TASKS
                                    if mbv01_metadata[t]["input_type"] == "structure")
    assert set(METRICS) == {"regression", "classification"}


def test_class_threshold_is_matbenchs():
    from matbench.constants import CLF_THRESH

    assert CLASS_THRESHOLD == CLF_THRESH
