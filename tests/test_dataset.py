"""Stage 4, dataset: balance, size, random negatives, seeding."""
import introspection_experiment as ie


def test_dataset_balance_and_size():
    ds = ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60", "80", "100"], 6, seed=0)
    assert len(ds) == 480 and sum(ds["injected"]) == 240
    for concept in ie.TRAIN_CONCEPTS:
        strengths = [r["strength"] for r in ds if r["concept"] == concept]
        assert len(strengths) == 6 and set(strengths) == {"40", "60", "80", "100"}
    assert set(ds["question"]) == set(ie.DETECTION_QUESTIONS)
    negatives = [r for r in ds if not r["injected"]]
    assert all(r["completion"] == ie.NEGATIVE_COMPLETION and r["strength"] == "" for r in negatives)


def test_random_negatives_replace_part_of_the_negatives():
    names = list(ie.random_directions(60, 8, seed=0, prefix="train-random"))
    ds = ie.build_dataset(ie.TRAIN_CONCEPTS, ["1x", "2x"], 3, seed=0, random_negatives=names)
    positives = [r for r in ds if r["completion"] != ie.NEGATIVE_COMPLETION]
    negatives = [r for r in ds if r["completion"] == ie.NEGATIVE_COMPLETION]
    assert len(positives) == len(negatives) == 120
    with_direction = [r for r in negatives if r["concept"]]
    assert sorted(r["concept"] for r in with_direction) == sorted(names)  # each direction used once, labelled "no"
    assert all(r["injected"] and r["strength"] in ("1x", "2x") for r in with_direction)
    assert sum(r["strength"] == "1x" for r in with_direction) == 30  # stratified over the training strengths
    assert all(not r["injected"] and r["strength"] == "" for r in negatives if not r["concept"])


def test_dataset_is_seeded():
    a = ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=1).to_list()
    assert a == ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=1).to_list()
    assert a != ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=2).to_list()
