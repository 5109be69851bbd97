"""What recipients hit: the open pixel, signed click redirects and the unsubscribe page, with the
arrivals and scanner-burst windows their events pass through and the pages a recipient sees."""
