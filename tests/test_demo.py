"""The README's main job (`make demo`): the smoke vision suite, TA and AdaRank on an embedded local Ray, the table."""

import json

import ray

from rankmerge.service.demo import run_demo


def test_main_job_runs_adarank_on_an_embedded_ray_and_prints_the_table(vision_smoke_suite, tmp_path):
    assert not ray.is_initialized()
    try:
        text = run_demo(tmp_path, steps=6, executor="ray", suite_root=vision_smoke_suite.root)
    finally:
        ray.shutdown()  # the embedded cluster belongs to this test only
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task"))
    assert lines[header].split()[1:] == ["pretrained", "individual", "TA", "λ=0.3", "AdaRank-TA"]
    end = lines.index("", header)
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:end]}
    assert lines[end + 1].startswith("AdaRank-TA "), "the demo says whether the adaptive merge beat Task Arithmetic"
    assert set(rows) == {*vision_smoke_suite.task_dirs, "average"}
    assert all(len(cells) == 4 and all(c.endswith("%") for c in cells) for cells in rows.values())
    report = json.loads((tmp_path / "out" / "adarank_ta" / "merge_report.json").read_text())
    assert report["executor"] == "ray" and report["resources"]["shards"] == 2 and len(report["history"]) == 6
    individual, ta = (float(rows["average"][i].rstrip("%")) for i in (1, 2))
    assert individual > ta, "the suite must show a merging gap"
