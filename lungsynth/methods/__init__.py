"""The five method chapters (03-07), peers that share everything below them."""
