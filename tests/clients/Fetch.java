// Java's HttpClient configured the way keyhole's webhook configures the JVM: JAVA_TOOL_OPTIONS
// with https.proxyHost/Port and a PKCS12 trust store (the JVM reads no proxy variables).
// HttpClient prefers HTTP/2, so this also proves Java falls back to HTTP/1.1 through keyhole.
// usage: java Fetch.java METHOD URL
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Fetch {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder()
                .proxy(java.net.ProxySelector.getDefault())
                .followRedirects(HttpClient.Redirect.NEVER)
                .build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[1]))
                .method(args[0], HttpRequest.BodyPublishers.noBody()).build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        StringBuilder out = new StringBuilder();
        out.append("{\"status\":").append(response.statusCode())
           .append(",\"version\":\"").append(response.version()).append("\",\"headers\":[");
        boolean first = true;
        for (var entry : response.headers().map().entrySet()) {
            for (String value : entry.getValue()) {
                if (!first) out.append(",");
                first = false;
                out.append("[").append(quote(entry.getKey())).append(",").append(quote(value)).append("]");
            }
        }
        out.append("],\"body\":").append(quote(response.body())).append("}");
        System.out.println(out);
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }
}
