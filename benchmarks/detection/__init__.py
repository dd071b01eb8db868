"""The detection benchmark's parts (``bench_detection.py --corpus``): the faults and what
answers them (:mod:`.faults`), the hand rules (:mod:`.hand_rules`), the verdicts
(:mod:`.verdicts`), whether alerts stay on while a fault lasts (:mod:`.endings`), the
synthetic streams (:mod:`.synthetic`), rho's lead or lag
(:mod:`.rho_lead`) and the price of a one-record path (:mod:`.tail_price`)."""
