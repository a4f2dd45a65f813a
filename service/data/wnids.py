"""A hundred real ImageNet-1k synsets (the first 100 in sorted-wnid order).

Used by the synthetic dataset generator so that generated data carries
real-looking WordNet ids and names, and as a fallback for class names when a
raw layout ships no synset mapping.
"""

from __future__ import annotations

IMAGENET_SYNSETS: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"), ("n01494475", "hammerhead"), ("n01496331", "electric ray"),
    ("n01498041", "stingray"), ("n01514668", "cock"), ("n01514859", "hen"),
    ("n01518878", "ostrich"), ("n01530575", "brambling"), ("n01531178", "goldfinch"),
    ("n01532829", "house finch"), ("n01534433", "junco"), ("n01537544", "indigo bunting"),
    ("n01558993", "robin"), ("n01560419", "bulbul"), ("n01580077", "jay"),
    ("n01582220", "magpie"), ("n01592084", "chickadee"), ("n01601694", "water ouzel"),
    ("n01608432", "kite"), ("n01614925", "bald eagle"), ("n01616318", "vulture"),
    ("n01622779", "great grey owl"), ("n01629819", "European fire salamander"),
    ("n01630670", "common newt"), ("n01631663", "eft"), ("n01632458", "spotted salamander"),
    ("n01632777", "axolotl"), ("n01641577", "bullfrog"), ("n01644373", "tree frog"),
    ("n01644900", "tailed frog"), ("n01664065", "loggerhead"), ("n01665541", "leatherback turtle"),
    ("n01667114", "mud turtle"), ("n01667778", "terrapin"), ("n01669191", "box turtle"),
    ("n01675722", "banded gecko"), ("n01677366", "common iguana"), ("n01682714", "American chameleon"),
    ("n01685808", "whiptail"), ("n01687978", "agama"), ("n01688243", "frilled lizard"),
    ("n01689811", "alligator lizard"), ("n01692333", "Gila monster"), ("n01693334", "green lizard"),
    ("n01694178", "African chameleon"), ("n01695060", "Komodo dragon"), ("n01697457", "African crocodile"),
    ("n01698640", "American alligator"), ("n01704323", "triceratops"), ("n01728572", "thunder snake"),
    ("n01728920", "ringneck snake"), ("n01729322", "hognose snake"), ("n01729977", "green snake"),
    ("n01734418", "king snake"), ("n01735189", "garter snake"), ("n01737021", "water snake"),
    ("n01739381", "vine snake"), ("n01740131", "night snake"), ("n01742172", "boa constrictor"),
    ("n01744401", "rock python"), ("n01748264", "Indian cobra"), ("n01749939", "green mamba"),
    ("n01751748", "sea snake"), ("n01753488", "horned viper"), ("n01755581", "diamondback"),
    ("n01756291", "sidewinder"), ("n01768244", "trilobite"), ("n01770081", "harvestman"),
    ("n01770393", "scorpion"), ("n01773157", "black and gold garden spider"), ("n01773549", "barn spider"),
    ("n01773797", "garden spider"), ("n01774384", "black widow"), ("n01774750", "tarantula"),
    ("n01775062", "wolf spider"), ("n01776313", "tick"), ("n01784675", "centipede"),
    ("n01795545", "black grouse"), ("n01796340", "ptarmigan"), ("n01797886", "ruffed grouse"),
    ("n01798484", "prairie chicken"), ("n01806143", "peacock"), ("n01806567", "quail"),
    ("n01807496", "partridge"), ("n01817953", "African grey"), ("n01818515", "macaw"),
    ("n01819313", "sulphur-crested cockatoo"), ("n01820546", "lorikeet"), ("n01824575", "coucal"),
    ("n01828970", "bee eater"), ("n01829413", "hornbill"), ("n01833805", "hummingbird"),
    ("n01843065", "jacamar"), ("n01843383", "toucan"), ("n01847000", "drake"),
    ("n01855032", "red-breasted merganser"), ("n01855672", "goose"),
)

KNOWN_NAMES: dict[str, str] = dict(IMAGENET_SYNSETS)
