"""`rankmerge bench`: run every merge method on a real-data suite through the ordinary job machinery, then tabulate
and plot the results.

grid.py     which methods run, their validation grids and fixed test-time-adaptation settings
layout.py   where a suite, its results and each method's runs live
data.py     label-free test inputs and the seeded held-out halves, written as ordinary data files
evaluate.py per-task accuracy of published outputs on a named split
runner.py   one suite, every method: val selection, adaptation, records
spectra.py  intrinsic ranks of the task vectors and the owner of every AdaRank mask component
report.py   markdown and JSON tables from the records
plots.py    mask heatmaps and learned-vs-intrinsic rank plots
"""
