"""Fixed product orders of MVTec-AD and VisA (docs/reproduction.md §9) and the validation products
(docs/reproduction.md §7).

The whole project imports these constants from here; nothing else should spell the lists out.
"""

# docs/reproduction.md §9: MVTec-AD products are processed and listed in this fixed order.
MVTEC_PRODUCTS = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

# docs/reproduction.md §9: VisA products are processed and listed in this fixed order.
VISA_PRODUCTS = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)

# Datasets whose product order is fixed; every other dataset's products are discovered (sorted).
FIXED_PRODUCT_ORDERS = {"mvtec": MVTEC_PRODUCTS, "visa": VISA_PRODUCTS}

# docs/reproduction.md §7: after each training epoch the reference reports pixel AP on five
# products of the
# *other* dataset.  Keyed by the dataset the products belong to, in the reference's order.
MVTEC_VAL_PRODUCTS = ("bottle", "hazelnut", "wood", "zipper", "leather")
VISA_VAL_PRODUCTS = ("chewinggum", "cashew", "pipe_fryum", "capsules", "candle")
VAL_PRODUCTS = {"mvtec": MVTEC_VAL_PRODUCTS, "visa": VISA_VAL_PRODUCTS}

# Training on one dataset validates on the other one (docs/reproduction.md §7).
VAL_DATASET_FOR_TRAINING_ON = {"visa": "mvtec", "mvtec": "visa"}
