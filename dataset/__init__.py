"""Dataset preparation: original datasets -> the standardized layout + meta files
(docs/reproduction.md §9).

Command-line tools (run from the repository root):

* ``python dataset/make_dataset_new.py --dataset NAME --src_path ORIGINAL \\
  --dst_path ./dataset/mvisa/data``
* ``python dataset/make_meta.py --data_path ./dataset/mvisa/data --dataset NAME``

Importable pieces: :mod:`dataset.products` (fixed product orders), :mod:`dataset.common`
(errors, plan types, listing helpers), :mod:`dataset.writer` (running ids, BMP/PNG writing,
atomic replacement), :mod:`dataset.layouts` (one planner per original layout).
"""
