#!/usr/bin/env python3
"""A pretraining dataset of many entries over a few prepared videos, for loss-curve runs.

`marlin prepare` of the shared samples gives a handful of videos; an epoch of `marlin pretrain`
draws one clip per train entry, so a 200-step run on them would be 100+ short epochs, each
with its validation and checkpoint. This writes a dataset root whose train_set.csv lists
COPIES entries, each a symlink to one of the prepared train videos (crops and parsing maps)
in turn, with a random clip drawn from it per epoch as usual; val_set.csv keeps the prepared
validation videos.

    bench/curve_data.py PREPARED_ROOT OUT_ROOT COPIES
"""
import csv
import os
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    src, out, copies = os.path.abspath(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def rows(name):
        with open(os.path.join(src, name)) as f:
            return [(r["path"], r["len"]) for r in csv.DictReader(f)]

    train, val = rows("train_set.csv"), rows("val_set.csv")
    if not train or not val or copies < 1:
        sys.exit(f"{src}: needs train and val videos (has {len(train)}, {len(val)})")
    for db in ("crop_images_DB", "face_parsing_images_DB"):
        os.makedirs(os.path.join(out, db, "copies"), exist_ok=True)
        for path, _ in val:
            link = os.path.join(out, db, path)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(os.path.join(src, db, path), link)
    listed = []
    for i in range(copies):
        path, n = train[i % len(train)]
        name = f"copies/{i:04d}"
        for db in ("crop_images_DB", "face_parsing_images_DB"):
            link = os.path.join(out, db, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(src, db, path), link)
        listed.append((name, n))
    for name, part in (("train_set.csv", listed), ("val_set.csv", val)):
        with open(os.path.join(out, name), "w") as f:
            f.write("path,len\n" + "".join(f"{p},{n}\n" for p, n in part))
    print(f"{out}: {copies} train entries over {len(train)} videos, {len(val)} val videos")


if __name__ == "__main__":
    main()
