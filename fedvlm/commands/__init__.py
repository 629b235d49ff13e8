"""The command line's commands, one module each: ``fedvlm fit`` (:mod:`.fit`), ``fedvlm evaluate``
(:mod:`.evaluate`), ``fedvlm explain`` (:mod:`.explain`), ``fedvlm deploy`` (:mod:`.deploy`) and
``fedvlm data`` (:mod:`.data`); :mod:`fedvlm.cli` parses arguments and dispatches to them."""
