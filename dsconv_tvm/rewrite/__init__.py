"""The Relax pass that rewrites conv2d into DSConv (:mod:`.dsconv_rewrite`), the description of one
converted layer it hands to a backend (:mod:`.layer`) and its report (:mod:`.report`)."""
