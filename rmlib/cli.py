"""`python -m rmlib ...`: the command line. Every user error exits 2 with one clear line.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from rmlib import RmlibError, __version__
from rmlib.arguments import fraction, non_negative_int, positive_float, positive_int
from rmlib.config import PROFILES
from rmlib.outputs import check_outputs, write_json


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"rmlib: error: {message} (see `{self.prog} --help`)\n")


def _cmd_backfill(args: argparse.Namespace) -> int:
    from rmlib.evaluation.backfill import backfill_arrays
    from rmlib.evaluation.emb_file import centred_on, load_backfill_arrays
    from rmlib.evaluation.orders import ORDER_POLICIES
    from rmlib.figures import plot_curves
    from rmlib.provenance import provenance
    from rmlib.report import summary_text

    inputs = [args.emb] + [Path(p) for p in (args.order_train, args.order, args.centre)
                           if p is not None and p not in ORDER_POLICIES]
    check_outputs({"--json": args.json, "--plot": args.plot}, inputs=inputs,
                  figures=["--plot"])
    start = time.time()
    arrays = load_backfill_arrays(args.emb)
    if args.centre is not None:
        arrays = centred_on(arrays, args.centre)
    order = _order(args, arrays)
    curve, conditions = backfill_arrays(arrays, seed=args.seed, order=order)
    protocol = ("leave-one-out" if arrays.leave_one_out
                else "camera" if arrays.query_cams is not None else "plain")
    print(f"{args.emb}: {len(arrays.old_query)} queries, {len(arrays.old_gallery)} gallery items, "
          f"{protocol} protocol, backfill order {args.order}"
          + (f" (seed {args.seed})" if args.order in ORDER_POLICIES
             and ORDER_POLICIES[args.order].seeded else ""))
    print(summary_text(curve, conditions))
    if args.json:
        out = curve.to_dict()
        out["conditions"] = conditions
        out["provenance"] = provenance(
            config={"input": str(args.emb), "seed": args.seed, "protocol": protocol,
                    "order": str(args.order), "order_train": str(args.order_train or ""),
                    "centred_on": str(args.centre or "")},
            wall_time_s=time.time() - start, commit=args.config.commit)
        write_json(args.json, out)
        print(f"wrote {args.json}")
    if args.plot:
        plot_curves({Path(args.emb).stem: curve}, args.plot, title=str(args.emb))
        print(f"wrote {args.plot}")
    return 0


def _order(args: argparse.Namespace, arrays):
    """The backfill order --order asks for (None: the seeded random order)."""
    from rmlib.evaluation.emb_file import load_backfill_arrays
    from rmlib.evaluation.orders import ORDER_POLICIES, load_order, policy_order

    if args.order not in ORDER_POLICIES:
        if not Path(args.order).exists() and not Path(args.order).suffix:
            ORDER_POLICIES.spec(args.order)  # a misspelt policy, not a file: say which exist
        return load_order(args.order, len(arrays.old_gallery))
    spec = ORDER_POLICIES[args.order]
    if spec.needs_train and args.order_train is None:
        raise RmlibError(f"--order {args.order} learns from labelled training items: give "
                         "--order-train TRAIN_EMB.npz (the same two systems built on them)")
    if args.order_train is not None and not spec.needs_train:
        learners = [name for name, p in ORDER_POLICIES.items() if p.needs_train]
        raise RmlibError(f"--order-train is for --order {' or '.join(learners)} only")
    train = load_backfill_arrays(args.order_train) if args.order_train else None
    if train is not None and getattr(args, "centre", None) is not None:
        from rmlib.evaluation.emb_file import centred_on

        train = centred_on(train, args.centre)  # the policy learns on the systems it orders
    return policy_order(args.order, arrays, args.seed, train)


def _cmd_live(args: argparse.Namespace) -> int:
    from rmlib.evaluation.orders import ORDER_POLICIES
    from rmlib.serving.live import file_fingerprint, run_live

    inputs = [p for p in (None if args.order in ORDER_POLICIES else args.order,
                          args.order_train) if p is not None and Path(p).is_file()]
    return run_live(args.emb, lambda arrays: _order(args, arrays), uri=str(args.uri),
                    name=args.name, journal=args.journal, batch=args.batch, until=args.until,
                    seed=args.seed, order_name=args.order, overwrite=args.overwrite,
                    quiet=args.quiet, backend=args.backend,
                    order_inputs=file_fingerprint(*inputs), centre=args.centre)


def _cmd_study(args: argparse.Namespace) -> int:
    from rmlib.methods.studies import (
        backbone_seeds,
        chain,
        closed_form,
        heterogeneous,
        open_class,
        order_policies,
    )
    from rmlib.report import chain_text, table1_text

    if args.study == "orders":
        result = order_policies(args.dataset, args.config, progress=not args.quiet)
        rows = {f"{method} · {policy}" + (" (privileged)" if row["privileged"] else ""): row
                for method, by_policy in result["rows"].items()
                for policy, row in by_policy.items()}
        print(f"by backfill order, {args.config.name} profile:")
        print(table1_text(rows))
    elif args.study == "closed-form":
        result = closed_form(args.dataset, args.config, progress=not args.quiet)
        fits = ", ".join(f"{name} {max(seconds):.2f} s" for name, seconds
                         in result["fit_seconds"].items())
        print(f"closed-form and trained query transforms, {args.config.name} profile (fits "
              f"on {result['training_pairs']['items']:,} training pairs: {fits}):")
        print(table1_text(result["rows"]))
    elif args.study == "open-class":
        result = open_class(args.dataset, args.config, progress=not args.quiet)
        for split, rows in result["splits"].items():
            print(f"open classes, {split} ({result['queries'][split]:,} queries), "
                  f"{args.config.name} profile:")
            print(table1_text(rows))
    elif args.study == "chain":
        result = chain(args.dataset, args.config, progress=not args.quiet)
        print(chain_text(result))
    elif args.study == "heterogeneous":
        result = heterogeneous(args.dataset, args.config, progress=not args.quiet)
        print(f"upgrade across architectures, {args.config.name} profile:")
        print(table1_text(result["rows"]))
    else:
        result = backbone_seeds(args.dataset, args.config, progress=not args.quiet)
        print(f"over backbone seeds {result['rows']['Old']['backbone_seeds']}, "
              f"{args.config.name} profile (AUC_mAP, mean and std over backbones):")
        for name, row in result["rows"].items():
            print(f"  {name:14s} {100 * row['auc_mAP']:6.2f} ± "
                  f"{100 * row['auc_mAP_backbone_std']:.2f}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rmlib.methods.reproduce import train_backbones
    from rmlib.methods.setups import ROLES

    roles = ROLES if args.which == "both" else (args.which,)
    result = train_backbones(args.dataset, args.config, roles, progress=not args.quiet)
    print(f"{args.dataset} backbones, profile {result['provenance']['profile']} "
          f"(evaluated on {result[roles[0]]['test_images']} queries):")
    for role in roles:
        r = result[role]
        print(f"  {role}/{role}: mAP {100 * r['mAP']:.2f}  top-1 {100 * r['top1']:.2f}  "
              f"top-5 {100 * r['top5']:.2f}  ({r['parameters']:,} parameters, "
              f"trained in {r['train_wall_time_s'] / 60:.1f} min)")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from rmlib.methods.reproduce import reproduce
    from rmlib.report import table1_text

    tables = reproduce(args.dataset, args.config, progress=not args.quiet)
    prov = tables["table1"]["provenance"]
    print(f"Table 1, {args.dataset}, profile {prov['profile']} "
          f"({prov['wall_time_s'] / 60:.1f} min; FCT without side-information)")
    print(table1_text(tables["table1"]["rows"], tables["table1"]["paper"]))
    print("\nAblation")
    print(table1_text(tables["ablation"]["rows"]))
    print("\nBaselines as published, and their variants")
    print(table1_text(tables["baselines"]["rows"]))
    decision = tables["centring"]["decision"]
    print(f"\nEach system centred on its training mean (on validation: "
          f"{decision['decision']})")
    print(table1_text(tables["centring"]["rows"]))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from rmlib.own_upgrade import fit_command

    check_outputs({"--out": args.out}, inputs=[args.train])
    if args.epochs is not None and args.search_size:
        raise RmlibError("--search-size chooses the epochs on the hold-out; give it or "
                         "--epochs, not both")
    closed = args.method != "mcl"
    trained = [flag for flag, given in (("--tau", args.tau is not None),
                                        ("--epochs", args.epochs is not None),
                                        ("--search-size", args.search_size),
                                        ("--rho", args.rho is True)) if given]
    if closed and trained:
        raise RmlibError(f"--method {args.method} is solved in closed form, with psi alone: "
                         f"{', '.join(trained)} are for --method mcl only")
    rho = not closed if args.rho is None else args.rho
    info = fit_command(args.train, args.out, rho=rho, tau=args.tau, epochs=args.epochs,
                       search_size=args.search_size, progress=not args.quiet,
                       centre=args.centre, method=args.method)
    if info["normalised"]:
        print("the embeddings of TRAIN.npz are not unit length: fit L2-normalises them (and "
              "apply will normalise the evaluation file the same way)")
    selection = info["selection"]
    if selection:
        for what, key in (("tau", "val_auc_mAP"), ("width", "val_auc_mAP_by_hidden"),
                          ("epochs", "val_auc_mAP_by_epochs")):
            if len(selection[key]) > 1:
                scores = ", ".join(f"{k}: {100 * v:.2f}" for k, v in selection[key].items())
                print(f"{what} chosen on {selection['val_items']} held-out items by validation "
                      f"AUC_mAP (%): {scores}")
    if info["centred"]:
        print("each system centred on its mean over TRAIN.npz (recorded in COMPAT.pt; apply "
              "moves the evaluation file's embeddings by the same centres)")
    how = f"{args.method}, in closed form" if closed else \
        f"MCL, tau {info['tau']}, width {info['hidden']}, {info['epochs']} epochs"
    print(f"fitted psi{' and rho' if rho else ''} ({how}) on {info['items']:,} items in "
          f"{info['seconds']:.{1 if closed else 0}f} s; wrote {args.out}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from rmlib.evaluation.emb_file import load_backfill_arrays
    from rmlib.own_upgrade import apply_compat, is_unit

    check_outputs({"--out": args.out}, inputs=[args.compat, args.emb])
    naive = load_backfill_arrays(args.emb)
    arrays = apply_compat(args.compat, naive, force=args.force)
    if not all(map(is_unit, (naive.old_query, naive.old_gallery, naive.new_query,
                             naive.new_gallery))):
        print(f"the embeddings of {args.emb} are not unit length: normalised, as fit did "
              "(negative flips stay counted against the raw old system)")
    arrays.save(args.out)
    print(f"wrote {args.out}: the RM systems; evaluate with `python -m rmlib backfill {args.out}`")
    return 0


def _command(sub, name: str, func, short: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=short, description=description)
    p.set_defaults(func=func)
    return p


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _order_options(p: argparse.ArgumentParser, lead: str) -> None:
    """--order and --order-train, described by the registered order policies."""
    from rmlib.evaluation.orders import ORDER_POLICIES

    policies = "; ".join(f"{name} ({spec.summary})" for name, spec in ORDER_POLICIES.items())
    learners = " or ".join(n for n, spec in ORDER_POLICIES.items() if spec.needs_train)
    p.add_argument("--order", default="random", metavar="|".join(ORDER_POLICIES) + "|FILE",
                   help=f"{lead}{policies}; or a .npy / text file of gallery indices")
    p.add_argument("--order-train", type=Path, metavar="TRAIN_EMB.npz",
                   help=f"for --order {learners}: the same two systems on labelled training "
                        "items (never the evaluation set), in EMB.npz's format")


def _centre_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--centre", type=Path, metavar="TRAIN.npz",
                   help="centre each system on its own mean over training items and "
                        "L2-normalise: takes away the direction all of a model's embeddings "
                        "share (book/rank_merge). The file: fit's TRAIN.npz (old, new, "
                        "labels) or an EMB.npz of training items (its galleries' means); "
                        "never the evaluation set")


def _add_backfill(sub) -> None:
    p = _command(
        sub, "backfill", _cmd_backfill, "simulate an online backfill of your old and new "
        "embeddings", "Rank-merge the old and new systems at 21 backfill ratios t and report "
        "mAP, top-1, top-5, negative flips, AUCs and the paper's conditions (6)-(8). "
        "Distances are Euclidean on the arrays as given: L2-normalise them first if your "
        "systems search by cosine similarity. Labels are classes as given (-1 is not "
        "special).")
    p.add_argument("emb", type=Path, metavar="EMB.npz",
                   help="old_query, old_gallery, new_query, new_gallery, query_labels "
                        "[, gallery_labels, query_cams, gallery_cams, reference_query]")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the backfill order, a non-negative integer (default 0)")
    _order_options(p, "which items are re-embedded first: ")
    _centre_option(p)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the curves and AUCs as JSON")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="save the curves as a figure")


# The commands that train on a data set: what they do, and their extra arguments.
_TRAINING_COMMANDS = {
    "train": ("train (or reuse from the cache) the old and new backbones",
              "Train the old and/or new backbones of a profile (CIFAR-100: classes 0-49 / all "
              "100; Market-1501: the first half of the training identities / all), evaluate "
              "them and write <results>/<dataset>/<profile>/backbones.json. Interrupted runs "
              "resume.", _cmd_train),
    "reproduce": ("run whatever is missing and write Table 1 and the ablation",
                  "Train or reuse every backbone and transform of a profile, evaluate each "
                  "Table 1 row (Old, New, RM_naive, BCT, FCT, BiCT, RM) and the ablation "
                  "(RM_naive, +RQT, +CL, +MCL, +rho) along the backfill, and write "
                  "<results>/<dataset>/<profile>/table1.json and ablation.json.", _cmd_reproduce),
}


def _add_training(sub, name: str) -> None:
    short, description, func = _TRAINING_COMMANDS[name]
    p = _command(sub, name, func, short, description)
    from rmlib.methods.setups import DATASETS

    p.add_argument("dataset", choices=list(DATASETS))
    if name == "train":
        p.add_argument("which", choices=["old", "new", "both"])
    p.add_argument("--profile", choices=list(PROFILES),
                   help="default: $RMLIB_PROFILE, else paper on a GPU and cpu otherwise")
    _quiet(p)


def _add_live(sub) -> None:
    p = _command(
        sub, "live", _cmd_live, "run (or resume) a live backfill of your embeddings in Milvus",
        "Put the old gallery of EMB.npz into a Milvus database (a Milvus Lite file by "
        "default), then move items to the new part in batches, in the backfill order, with "
        "their new embeddings, until the backfilled fraction reaches --until. Killed at any "
        "moment, the same command resumes, finishing the interrupted batch (from the same "
        "EMB.npz and order only: the journal records both, and keeps the order beside "
        "it, so a learned order is not trained again). Ends with what "
        "the index serves: mAP and top-k over each query's whole merged ranking.")
    p.add_argument("emb", type=Path, metavar="EMB.npz", help="as for `backfill`")
    from rmlib.serving.parts import BACKENDS

    durable = [name for name, spec in BACKENDS.items() if spec.durable]
    p.add_argument("--backend", default="milvus", choices=durable,
                   help="where the two parts live: a backend whose data outlives the process "
                        "(default milvus)")
    p.add_argument("--uri", default="online_backfill.db",
                   help="a Milvus Lite file (default online_backfill.db) or a server's URI")
    p.add_argument("--name", default="gallery", help="the index's name: letters, digits and "
                   "underscores (collections NAME_old and NAME_new; default gallery)")
    p.add_argument("--journal", type=Path, help="the journal file (default: beside a Milvus "
                   "Lite file; required for a server)")
    p.add_argument("--batch", type=positive_int, default=10_000,
                   help="items per backfill batch (default 10,000)")
    p.add_argument("--until", type=fraction, default=1.0,
                   help="stop at this backfilled fraction t, in (0, 1] (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random backfill order (default 0)")
    _order_options(p, "which items are re-embedded first, as for `backfill`: ")
    _centre_option(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start the live index NAME again from the old gallery")
    _quiet(p)


def _add_study(sub) -> None:
    p = _command(
        sub, "study", _cmd_study, "run a study beyond the paper (backfill orders, an upgrade "
        "across architectures, the spread over backbone seeds, closed-form psi, open classes, "
        "an upgrade chain)",
        "orders: RM_naive and RM under the random, uncertainty and oracle backfill orders, "
        "with every seed, into <results>/<dataset>/<profile>/order_policies.json. "
        "heterogeneous: Old, New, RM_naive, RM and New+rho with a CIFAR ResNet-20 old model, "
        "into heterogeneous.json. backbone-seeds: Old, New, RM_naive, RM_naive+cal, RM and "
        "New+rho with the old and new backbones trained again from two more seeds (all else "
        "at seed 0), into backbone_seeds.json. closed-form: psi by orthogonal Procrustes "
        "and by a least-squares affine map (with and without the training-free "
        "calibration) beside RQT, CL, MCL and RM, into closed_form.json. open-class: "
        "Table 1's rows with the old model on classes 0-39 and the new one on 0-79, "
        "evaluated on the classes neither saw (80-99) and on all of them, into "
        "open_class.json. chain: a third model (the better of a longer- and a wider-trained "
        "net on held-out training images) arriving when the first backfill is at t1 = "
        "0.25, 0.5, 0.75; finish first, restart, and three-system naive and RM merges over "
        "the whole period, into chain.json.")
    from rmlib.methods.studies import STUDIES

    p.add_argument("study", choices=list(STUDIES))
    p.add_argument("dataset", choices=["cifar100"])
    p.add_argument("--profile", choices=list(PROFILES),
                   help="default: $RMLIB_PROFILE, else paper on a GPU and cpu otherwise")
    _quiet(p)


def _add_fit(sub) -> None:
    from rmlib.own_upgrade import METHODS

    p = _command(
        sub, "fit", _cmd_fit, "fit psi (and rho) on your own old and new embeddings",
        "Train the reverse query transform psi (and the new embedding rho) with "
        "metric-compatible contrastive learning on old and new embeddings of the same "
        "labelled training items (tau is chosen on a held-out split unless given), or solve "
        "psi in closed form (--method procrustes or affine: seconds, no labels used). "
        "Every embedding is L2-normalised first (psi and rho live on the unit sphere).")
    p.add_argument("train", type=Path, metavar="TRAIN.npz",
                   help="arrays old (N, d_old), new (N, d_new), labels (N,)")
    p.add_argument("--out", type=Path, required=True, metavar="COMPAT.pt")
    p.add_argument("--method", choices=METHODS, default="mcl",
                   help="mcl (trained, the paper's; default), procrustes (an orthogonal map "
                        "by SVD) or affine (least squares)")
    p.add_argument("--rho", action=argparse.BooleanOptionalAction, default=None,
                   help="also learn rho, the new embedding (default: yes with mcl; the "
                        "closed forms fit psi alone)")
    p.add_argument("--tau", type=positive_float,
                   help="temperature, finite and positive; default: chosen on validation")
    p.add_argument("--epochs", type=positive_int,
                   help="training epochs (default: the CIFAR-100 recipe's, 6)")
    p.add_argument("--search-size", action="store_true",
                   help="also choose the width and epochs of psi/rho on the hold-out, as the "
                        "CIFAR-100 recipe does (about 4x the time)")
    p.add_argument("--centre", action="store_true",
                   help="centre each system on its own mean over TRAIN.npz and L2-normalise "
                        "again before fitting (recorded in COMPAT.pt, which apply follows): "
                        "takes away the direction all of a model's embeddings share "
                        "(book/rank_merge)")
    _quiet(p)


def _add_apply(sub) -> None:
    p = _command(
        sub, "apply", _cmd_apply, "turn an evaluation file into the RM system's arrays",
        "Apply fitted transforms to EMB.npz: the old side becomes psi(rho(new_query)) "
        "against old_gallery, the new side rho(new_query) against rho(new_gallery). "
        "Every embedding is L2-normalised first, and centred on the training means when "
        "fit was given --centre, as fit did.")
    p.add_argument("compat", type=Path, metavar="COMPAT.pt")
    p.add_argument("emb", type=Path, metavar="EMB.npz")
    p.add_argument("--out", type=Path, required=True, metavar="EMB_RM.npz")
    p.add_argument("--force", action="store_true",
                   help="skip the check that the embeddings come from the fitted model pair")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m rmlib",
        description="Online backfilling for image retrieval (rank merge, RQT, MCL, rho).")
    parser.add_argument("--version", action="version", version=f"rmlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_backfill(sub)
    _add_training(sub, "train")
    _add_training(sub, "reproduce")
    _add_fit(sub)
    _add_apply(sub)
    _add_study(sub)
    _add_live(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from rmlib.config import Config

        # the one read of the environment; results record the code this started with
        args.config = Config.from_env(getattr(args, "profile", None))
        return args.func(args)
    except RmlibError as exc:
        print(f"rmlib: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rmlib: interrupted", file=sys.stderr)
        return 130
