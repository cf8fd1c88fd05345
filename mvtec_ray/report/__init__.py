"""Stage 5, report: the results tables, figures, the HTML report and the overlay gallery."""
