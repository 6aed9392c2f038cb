"""Embedded default data: a deterministic synthetic multi-domain sequential-recommendation set.

Why: the quickstart, the tests and CI need data that ships with the package, is small enough for a
2-core CPU, and has the structure the cross-domain methods exploit.

Structure. Every domain has items on the same grid: THEME x TIER x a few products. Titles are built
from a small vocabulary, "<Brand> <Theme> <Noun>, <Tier> edition", where theme and tier words are
shared by all domains and nouns are domain-specific. Each user index has one latent taste (a
sparse Dirichlet draw over themes) shared by all domains, and every domain uses the same sequential
rule: mostly stay in the current theme and move one tier up, sometimes jump to another theme of the
user's taste, rarely a random item. So a model that learns "same theme, next tier" from the titles
of source domains transfers to a target domain whose items it never saw; item-id models cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from xkern.data.domain import DomainData, write_processed
from xkern.data.splits import by_user, split_users
from xkern.errors import InputError

THEMES = ["Ocean", "Forest", "Desert", "Arctic", "Galaxy", "Volcano", "Jungle", "Prairie", "Canyon", "Harbor"]
TIERS = ["Starter", "Classic", "Advanced", "Pro", "Elite"]
BRANDS = ["Acme", "Nova", "Zenit", "Orbit", "Pixel", "Terra", "Lumo", "Vexa", "Quill", "Brio"]
DOMAIN_NOUNS = {
    "Toys": ["Puzzle", "Kite", "Robot", "Blocks", "Doll", "Train", "Yo-Yo", "Plush"],
    "Sports": ["Ball", "Racket", "Helmet", "Jersey", "Glove", "Bottle", "Backpack", "Mat"],
    "Tools": ["Drill", "Wrench", "Saw", "Hammer", "Level", "Clamp", "Pliers", "Sander"],
    "Kitchen": ["Pan", "Kettle", "Knife", "Mixer", "Bowl", "Grater", "Whisk", "Toaster"],
    "Books": ["Novel", "Atlas", "Cookbook", "Guide", "Comic", "Journal", "Almanac", "Diary"],
    "Garden": ["Hose", "Rake", "Planter", "Shovel", "Trowel", "Sprinkler", "Pruner", "Lantern"],
}


@dataclass
class SyntheticConfig:
    """Sizes and behaviour of the generator. Defaults: 3 domains x 1000 users x 256 items."""

    domains: tuple[str, ...] = ("Toys", "Sports", "Tools")
    n_users: int = 1000  # per domain, before the by-user split
    n_themes: int = 8
    n_tiers: int = 4
    items_per_cell: int = 8  # products per (theme, tier)
    min_len: int = 5
    max_len: int = 12
    taste_alpha: float = 0.3  # Dirichlet concentration: small = users focus on few themes
    p_next_tier: float = 0.6  # same theme, one tier up
    p_same_theme: float = 0.15  # same theme, any tier
    p_noise: float = 0.1  # any item of the domain
    test_frac: float = 0.2
    val_frac: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        self.domains = tuple(self.domains)
        unknown = [d for d in self.domains if d not in DOMAIN_NOUNS]
        if unknown:
            raise InputError(f"unknown synthetic domain(s) {unknown}; choose from {sorted(DOMAIN_NOUNS)}")
        if not 1 <= self.n_themes <= len(THEMES) or not 1 <= self.n_tiers <= len(TIERS):
            raise InputError(f"n_themes <= {len(THEMES)} and n_tiers <= {len(TIERS)}")
        if not 1 <= self.items_per_cell <= 8:
            raise InputError("items_per_cell must be in 1..8 (one noun each)")
        if self.min_len < 3 or self.max_len < self.min_len:
            raise InputError("need 3 <= min_len <= max_len")
        if self.p_next_tier + self.p_same_theme + self.p_noise > 1:
            raise InputError("transition probabilities sum above 1")

    @property
    def n_items(self) -> int:
        return self.n_themes * self.n_tiers * self.items_per_cell


def item_index(cfg: SyntheticConfig, theme: int, tier: int, j: int) -> int:
    return (theme * cfg.n_tiers + tier) * cfg.items_per_cell + j


def item_titles(cfg: SyntheticConfig, domain: str, rng: np.random.Generator) -> list[str]:
    nouns = DOMAIN_NOUNS[domain]
    titles = []
    for theme in range(cfg.n_themes):
        for tier in range(cfg.n_tiers):
            brands = rng.choice(len(BRANDS), size=cfg.items_per_cell, replace=True)
            for j in range(cfg.items_per_cell):
                titles.append(f"{BRANDS[brands[j]]} {THEMES[theme]} {nouns[j]}, {TIERS[tier]} edition")
    return titles


def _sequence(
    cfg: SyntheticConfig, taste: np.ndarray, pop: np.ndarray, rng: np.random.Generator
) -> list[int]:
    start_tier = np.array([0.5, 0.3, 0.15, 0.05, 0.0][: cfg.n_tiers])
    start_tier /= start_tier.sum()
    length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    theme = int(rng.choice(cfg.n_themes, p=taste))
    tier = int(rng.choice(cfg.n_tiers, p=start_tier))
    seq: list[int] = []
    while len(seq) < length:
        for _ in range(10):  # avoid repeats within a sequence
            j = int(rng.choice(cfg.items_per_cell, p=pop[theme, tier]))
            item = item_index(cfg, theme, tier, j)
            if item not in seq:
                break
        if item not in seq:
            seq.append(item)
        r = rng.random()
        if r < cfg.p_next_tier:
            tier = min(tier + 1, cfg.n_tiers - 1)
        elif r < cfg.p_next_tier + cfg.p_same_theme:
            tier = int(rng.integers(cfg.n_tiers))
        elif r < cfg.p_next_tier + cfg.p_same_theme + cfg.p_noise:
            theme, tier = int(rng.integers(cfg.n_themes)), int(rng.integers(cfg.n_tiers))
        else:
            theme = int(rng.choice(cfg.n_themes, p=taste))
            tier = int(rng.choice(cfg.n_tiers, p=start_tier))
    return seq


def generate_sequences(cfg: SyntheticConfig) -> dict[str, tuple[dict[int, list[int]], list[str]]]:
    """domain -> (user index -> sequence, titles). User u has the same taste in every domain."""
    root = np.random.default_rng(cfg.seed)
    tastes = root.dirichlet(np.full(cfg.n_themes, cfg.taste_alpha), size=cfg.n_users)
    tastes = (tastes + 1e-6) / (tastes + 1e-6).sum(axis=1, keepdims=True)
    out = {}
    for d, domain in enumerate(cfg.domains):
        rng = np.random.default_rng([cfg.seed, d + 1])
        titles = item_titles(cfg, domain, rng)
        # Zipf-like popularity of the products inside each (theme, tier) cell
        zipf = 1.0 / np.arange(1, cfg.items_per_cell + 1) ** 0.8
        pop = np.stack([rng.permutation(zipf) for _ in range(cfg.n_themes * cfg.n_tiers)])
        pop = (pop / pop.sum(axis=1, keepdims=True)).reshape(cfg.n_themes, cfg.n_tiers, -1)
        seqs = {u: _sequence(cfg, tastes[u], pop, rng) for u in range(cfg.n_users)}
        out[domain] = (seqs, titles)
    return out


def make_synthetic(cfg: SyntheticConfig | None = None) -> dict[str, DomainData]:
    """domain -> DomainData, split by user (test_frac) with a validation carve-out (val_frac)."""
    cfg = cfg or SyntheticConfig()
    out = {}
    for domain, (seqs, titles) in generate_sequences(cfg).items():
        train, test = split_users(seqs, test_frac=cfg.test_frac, seed=cfg.seed)
        s = by_user(train, test, val_frac=cfg.val_frac, seed=cfg.seed)
        out[domain] = DomainData(
            name=domain,
            n_items=cfg.n_items,
            titles=titles,
            train=s.train,
            val=s.val,
            test=s.test,
            item_ids=[f"SYN-{domain}-{i:05d}" for i in range(cfg.n_items)],
            meta={"source": "synthetic", **asdict(cfg)},
        )
    return out


def write_synthetic(out_dir: str, cfg: SyntheticConfig | None = None) -> list[str]:
    """Write each synthetic domain as a processed folder `<out_dir>/<domain>`; returns the paths."""
    cfg = cfg or SyntheticConfig()
    paths = []
    for domain, (seqs, titles) in generate_sequences(cfg).items():
        train, test = split_users(seqs, test_frac=cfg.test_frac, seed=cfg.seed)
        ids = [f"SYN-{domain}-{i:05d}" for i in range(cfg.n_items)]
        paths.append(str(write_processed(f"{out_dir}/{domain}", train, test, titles, ids)))
    return paths
