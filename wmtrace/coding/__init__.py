"""The coding layer: a buyer's ID and keyed tag as a Reed-Solomon codeword (`codes`), everything derived
from a master's key (`keys`), and scoring with a false-accusation bound (`accuse`). It knows no scheme,
registry, API or CLI: soft bits in, a buyer and a bound out."""
